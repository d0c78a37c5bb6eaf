"""``python -m ssroute.prune checkpoint=RUN target_sparsity=0.6 [distill=layerwise|logits|none] [overrides]``.

CoFI structured pruning (Xia et al. 2022) of a ``model=vit`` run — dense or
routed, pretrained or fine-tuned — with hard-concrete L0 masks, a Lagrangian
sparsity target and distillation from the unpruned model. Writes
``runs/prune/<time>/`` (``config.yaml``, ``checkpoints/last.ckpt`` holding the
smaller model, ``metrics.json``, ``report.md``, ``plots/``), which ``python -m
finetune checkpoint=runs/prune/<time>`` trains further, and prints the folder.
The logic is in :mod:`ssroute.prune.run`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ssroute.config import register_configs
from ssroute.errors import ConfigError

register_configs()


@hydra.main(config_path="../../configs", config_name="prune", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from ssroute.prune.run import run_prune
    from ssroute.train.base import NonFiniteLossError

    hydra_cfg = HydraConfig.get()
    try:
        run_dir = run_prune(cfg, Path(hydra_cfg.runtime.output_dir), list(hydra_cfg.overrides.task))
    except (ConfigError, NonFiniteLossError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"run folder: {run_dir}")


if __name__ == "__main__":
    main()
