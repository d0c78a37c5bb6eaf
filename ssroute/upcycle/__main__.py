"""``python -m ssroute.upcycle checkpoint=RUN [num_experts=8] [selection=mlp|random] [k=4] [layers=[1,3]]``.

Turns a dense run (``python -m pretrain`` or ``python -m finetune``) into a routed
one: each chosen FFN is split into ``num_experts`` experts by balanced k-means
and gets an ``mlp_selection`` router (MoEfication, Zhang et al. 2022). Writes
``runs/upcycle/<time>/checkpoints/last.ckpt``, which ``python -m finetune
checkpoint=runs/upcycle/<time>`` fine-tunes, and prints the folder. The logic
is in :mod:`ssroute.upcycle.run` and :mod:`ssroute.upcycle.split`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ssroute.errors import ConfigError


@hydra.main(config_path="../../configs", config_name="upcycle", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from ssroute.upcycle.run import save_upcycled, upcycle_checkpoint

    try:
        if not cfg.checkpoint:
            raise ConfigError("checkpoint is required; pass checkpoint=RUN_FOLDER of a dense pretraining or fine-tuning run.")
        layers = OmegaConf.to_container(cfg.layers) if cfg.layers is not None else None
        checkpoint = upcycle_checkpoint(
            str(cfg.checkpoint), num_experts=cfg.num_experts, layers=layers, selection=cfg.selection, k=cfg.k,
            steps=cfg.steps, images=cfg.images, seed=cfg.seed,
        )  # fmt: skip
        run_dir = save_upcycled(checkpoint, Path(HydraConfig.get().runtime.output_dir))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"router fit: {checkpoint['upcycle']['router_fit']}")
    print(f"run folder: {run_dir}")


if __name__ == "__main__":
    main()
