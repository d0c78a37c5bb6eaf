"""``python -m finetune checkpoint=PATH [overrides]``: supervised fine-tuning; prints the run folder."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ssroute.config import register_configs
from ssroute.errors import ConfigError

register_configs()


@hydra.main(config_path="../configs", config_name="finetune", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from ssroute.train.finetune import run_finetune
    from ssroute.train.pretrain_module import NonFiniteLossError

    hydra_cfg = HydraConfig.get()
    try:
        run_dir = run_finetune(cfg, Path(hydra_cfg.runtime.output_dir), list(hydra_cfg.overrides.task))
    except (ConfigError, NonFiniteLossError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"run folder: {run_dir}")


if __name__ == "__main__":
    main()
