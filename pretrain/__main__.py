"""``python -m pretrain [hydra overrides]``: self-supervised pretraining; prints the run folder."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ssroute.config import register_configs
from ssroute.errors import ConfigError

register_configs()


@hydra.main(config_path="../configs", config_name="pretrain", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from ssroute.train.pretrain import run_pretrain
    from ssroute.train.pretrain_module import NonFiniteLossError

    try:
        run_dir = run_pretrain(cfg, Path(HydraConfig.get().runtime.output_dir))
    except (ConfigError, NonFiniteLossError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"run folder: {run_dir}")


if __name__ == "__main__":
    main()
