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
    print_summary(run_dir)
    print(f"run folder: {run_dir}")


def print_summary(run_dir: Path) -> None:
    """The headline numbers of ``metrics.json``: probes, and routing agreement next to chance."""
    import json

    metrics_file = run_dir / "metrics.json"
    if not metrics_file.exists():  # not rank 0 of a multi-process run
        return
    m = json.loads(metrics_file.read_text())
    parts = [f"{key} {m[key]:.3f}" for key in ("linear_top1", "knn_top1") if key in m]
    if "routing_agreement" in m:
        parts.append(
            f"routing agreement {m['routing_agreement']:.3f} (chance {m['routing_agreement_chance']:.3f}), "
            f"usage entropy {m['expert_usage_entropy']:.3f}, dead experts {int(m['dead_experts'])}"
        )
    if parts:
        print("result: " + "; ".join(parts))


if __name__ == "__main__":
    main()
