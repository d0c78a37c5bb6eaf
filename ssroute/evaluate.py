"""``python -m ssroute.evaluate checkpoint=PATH [overrides]``: evaluate a pretrained or fine-tuned backbone.

Loads the backbone of a run (folder, ``.ckpt`` or ``latest``, ``ssroute.checkpoint``),
rebuilds the data the run used (``data=NAME`` / ``data.key=value`` override it)
and runs :func:`ssroute.eval.evaluation.evaluate_backbone` — the same code the
end of every run calls — writing into ``<run>/eval/`` (or ``out=DIR``)
``metrics.json`` (flat keys), ``plots/*.png`` and ``report.md``, then prints the
folder. Protocols (:data:`~ssroute.eval.evaluation.PROTOCOLS`):

- labelled, on frozen features of the test split against the labelled train
  split: weighted kNN (``ssroute.eval.knn``), linear probe (``ssroute.eval.linear``),
  few-shot (``ssroute.eval.fewshot``), retrieval precision@1 and MAP@R
  (``ssroute.eval.retrieval``), and kNN / linear at every block (``ssroute.eval.probes``);
- routing, on up to ``max_routing_images`` held-out images of an MoE model:
  agreement on the executed experts under the run's augmentation, by family and
  over strength (``ssroute.eval.stability``), analytics (``ssroute.eval.analytics``),
  content vs position (``ssroute.eval.position``);
- ``plots`` (``ssroute.eval.plots``), and always ``report.md`` (``ssroute.eval.report``).

``protocols=null`` runs every protocol the data and model support and says in
the report which were skipped; naming one they cannot support is an error.

"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ssroute.checkpoint import load_backbone, resolve_checkpoint, run_dir_of
from ssroute.data import build_data
from ssroute.errors import ConfigError
from ssroute.eval.evaluation import PROTOCOLS, Evaluation, evaluate_backbone

__all__ = ["PROTOCOLS", "evaluate_checkpoint", "main"]


def data_config(cfg: DictConfig, run_data: dict[str, Any], overrides: Sequence[str]) -> DictConfig:
    """The run's data section, unless ``data=NAME`` replaces it; ``data.key=value`` overrides apply on top."""
    if any(o.lstrip("+").startswith(("data=", "data.name=")) for o in overrides):
        return cfg.data
    data = OmegaConf.create(run_data)
    for override in overrides:
        key = override.lstrip("+~").partition("=")[0]
        if key.startswith("data."):
            OmegaConf.update(data, key[len("data.") :], OmegaConf.select(cfg, key), force_add=True)
    return data


def evaluate_checkpoint(cfg: DictConfig, overrides: Sequence[str] = ()) -> Evaluation:
    """Run the protocols of ``cfg`` (an :class:`ssroute.config.EvaluateConfig`) on a checkpoint and write the evaluation folder."""
    import torch

    from ssroute.checkpoint import load_pretrained

    if not cfg.checkpoint:
        raise ConfigError(
            "checkpoint is required; pass checkpoint=RUN_FOLDER (or a .ckpt file, or latest) of a pretraining or fine-tuning run."
        )
    file = resolve_checkpoint(str(cfg.checkpoint))
    run_config, _ = load_pretrained(str(file))
    run_dir = run_dir_of(file)
    data_cfg = data_config(cfg, run_config["data"], overrides)
    data = build_data(data_cfg, run_config.get("seed", 0))
    backbone, _, _ = load_backbone(str(file), data)
    backbone.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    return evaluate_backbone(
        backbone, data, data_cfg.augment, cfg,
        protocols=list(cfg.protocols) if cfg.protocols is not None else None,
        out_dir=Path(cfg.out) if cfg.out else run_dir / "eval", run_config=run_config, run=str(run_dir), data_name=data_cfg.name,
    )  # fmt: skip


def main() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from ssroute.config import register_configs
    from ssroute.train.run import quiet_third_party_logs

    register_configs()

    @hydra.main(config_path=str(Path(__file__).resolve().parents[1] / "configs"), config_name="evaluate", version_base="1.3")
    def run(cfg: DictConfig) -> None:
        quiet_third_party_logs()
        try:
            result = evaluate_checkpoint(cfg, list(HydraConfig.get().overrides.task))
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        for name, why in result.skipped.items():
            print(f"skipped {name}: {why}")
        print(f"evaluation folder: {result.out_dir}")

    run()


if __name__ == "__main__":
    main()
