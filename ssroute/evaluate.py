"""``python -m ssroute.evaluate checkpoint=PATH [overrides]``: evaluate a pretrained or fine-tuned backbone.

Loads the backbone of a run (folder, ``.ckpt`` or ``latest``), rebuilds the data
the run used (``data=NAME`` / ``data.key=value`` override it) and writes into
``<run>/eval/`` (or ``out=DIR``) ``metrics.json`` (flat keys), ``plots/*.png``
and ``report.md``, then prints the folder. Protocols (:data:`PROTOCOLS`):

- labelled, on frozen features of the test split against the labelled train
  split: weighted kNN (``ssroute.eval.knn``), linear probe (``ssroute.eval.linear``),
  few-shot (``ssroute.eval.fewshot``), retrieval precision@1 and MAP@R
  (``ssroute.eval.retrieval``), and kNN / linear at every block (``ssroute.eval.probes``);
- routing, on up to ``max_routing_images`` held-out images of an MoE model:
  stability under augmentation (``ssroute.eval.stability``) and analytics
  (``ssroute.eval.analytics``);
- ``plots`` (``ssroute.eval.plots``), and always ``report.md`` (``ssroute.eval.report``).

``protocols=null`` runs every protocol the data and model support and says in
the report which were skipped; naming one they cannot support is an error.
Pretraining and fine-tuning call :func:`evaluate_run` at the end (``evaluate=true``).
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ssroute.data import build_data
from ssroute.data.views import ViewAugment
from ssroute.errors import ConfigError
from ssroute.eval.features import eval_loader, extract
from ssroute.eval.fewshot import fewshot_accuracy
from ssroute.eval.knn import knn_accuracy
from ssroute.eval.linear import linear_probe_accuracy
from ssroute.eval.probes import block_probes, stacked_features
from ssroute.eval.report import render_report
from ssroute.eval.retrieval import retrieval_metrics
from ssroute.layers.moe import MoELayer
from ssroute.models import build_backbone
from ssroute.train.finetune import check_data_fits, load_pretrained, resolve_checkpoint
from ssroute.train.run import write_json_atomic

log = logging.getLogger(__name__)

LABELLED = ("knn", "linear", "fewshot", "retrieval", "block_probes")  # need labelled train and test images
ROUTING = ("stability", "analytics")  # need an MoE layer
PROTOCOLS = (*LABELLED, *ROUTING, "plots")


@dataclass
class Evaluation:
    """What one evaluation wrote."""

    out_dir: Path  # the evaluation folder
    metrics: dict[str, Any]  # the flat metrics written to metrics.json
    plots: list[Path] = field(default_factory=list)  # PNG files written under out_dir/plots
    skipped: dict[str, str] = field(default_factory=dict)  # protocol -> why it did not run


def choose_protocols(requested: Sequence[str] | None, labelled: bool, routed: bool, data_name: str) -> tuple[list[str], dict[str, str]]:
    """(protocols to run, skipped protocol -> reason); an explicit request the data or model cannot serve is an error.

    >>> choose_protocols(None, labelled=False, routed=True, data_name="image_folder")[1]["knn"]
    'data image_folder has no labels'
    """
    unknown = [p for p in requested or () if p not in PROTOCOLS]
    if unknown:
        raise ConfigError(f"protocols={list(requested)} names unknown protocol(s) {unknown}; choose from {list(PROTOCOLS)}.")
    if requested is not None:
        unlabelled = [p for p in requested if p in LABELLED and not labelled]
        if unlabelled:
            raise ConfigError(
                f"data {data_name} has no labels, so protocols {unlabelled} cannot run; drop them (e.g. protocols=[stability,analytics,plots]) or pass labelled data such as data=digits."
            )
        dense = [p for p in requested if p in ROUTING and not routed]
        if dense:
            raise ConfigError(
                f"protocols {dense} measure routing but this checkpoint has no MoE layer; drop them or evaluate a run with model.moe_layers set."
            )
    skipped = {}
    for name in PROTOCOLS if requested is None else ():
        if name in LABELLED and not labelled:
            skipped[name] = f"data {data_name} has no labels"
        elif name in ROUTING and not routed:
            skipped[name] = "no MoE layer"
    chosen = [p for p in (requested if requested is not None else PROTOCOLS) if p not in skipped]
    return chosen, skipped


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


def load_backbone_state(backbone: torch.nn.Module, state: dict[str, torch.Tensor], file: Path) -> None:
    """``load_state_dict`` with one sentence naming what does not match."""
    expected = backbone.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [k for k in expected if k in state and expected[k].shape != state[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} weight(s) the model needs are missing, e.g. {missing[0]}")
    if unexpected:
        problems.append(f"{len(unexpected)} weight(s) the model lacks, e.g. {unexpected[0]}")
    if shapes:
        k = shapes[0]
        problems.append(f"{k} is {list(state[k].shape)} in the checkpoint but {list(expected[k].shape)} in the model")
    if problems:
        raise ConfigError(
            f"checkpoint {file} does not fit the model its config builds on this data ({'; '.join(problems)}); evaluate it on the data it was trained on, with the config saved beside its weights."
        )
    backbone.load_state_dict(state)


def _images(split, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    count = len(split) if limit is None else min(limit, len(split))
    if split.images is not None:
        return split.images[:count], split.labels[:count]
    return torch.stack([split[i][0] for i in range(count)]), split.labels[:count]


def _optional(module: str, name: str):
    """A function of a protocol module that may not exist in this checkout (None then)."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def evaluate_checkpoint(cfg: DictConfig, overrides: Sequence[str] = ()) -> Evaluation:
    """Run the protocols of ``cfg`` (an :class:`ssroute.config.EvaluateConfig`) and write the evaluation folder."""
    start = time.perf_counter()
    if not cfg.checkpoint:
        raise ConfigError(
            "checkpoint is required; pass checkpoint=RUN_FOLDER (or a .ckpt file, or latest) of a pretraining or fine-tuning run."
        )
    file = resolve_checkpoint(str(cfg.checkpoint))
    run_config, state = load_pretrained(str(file))
    run_dir = file.parent.parent
    out_dir = Path(cfg.out) if cfg.out else run_dir / "eval"
    run_cfg = OmegaConf.create(run_config)
    data_cfg = data_config(cfg, run_config["data"], overrides)
    data = build_data(data_cfg, run_cfg.get("seed", 0))
    check_data_fits(data_cfg.name, data, state, run_cfg.model.patch_size)
    backbone = build_backbone(run_cfg, data.image_size, data.channels)
    load_backbone_state(backbone, state, file)
    routed = any(isinstance(m, MoELayer) for m in backbone.modules())
    labelled = data.labeled and data.test is not None
    requested = list(cfg.protocols) if cfg.protocols is not None else None
    protocols, skipped = choose_protocols(requested, labelled, routed, data_cfg.name)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backbone.to(device).eval()
    augment = ViewAugment(data_cfg.augment, data.channels, data.image_size, data.mean, data.std).to(device)
    metrics: dict[str, Any] = {
        "data": data_cfg.name,
        "num_train": len(data.probe_train),
        "num_test": len(data.test) if data.test is not None else 0,
    }
    probes: dict[str, float] = {}
    if any(p in LABELLED for p in protocols):
        metrics.update(labelled_protocols(cfg, protocols, backbone, augment, data))
        probes = {k: v for k, v in metrics.items() if k.startswith("block")}

    stability = analytics = None
    held_out = data.test if data.test is not None else data.train
    images, labels = _images(held_out, cfg.max_routing_images)
    if "stability" in protocols and cfg.stability_pairs > 0:
        measure = _optional("ssroute.eval.stability", "augmentation_stability")
        if measure is None:
            skipped["stability"] = "ssroute.eval.stability is not in this checkout"
        else:
            stability = measure(backbone, data_cfg.augment, augment.normalize, images.to(device), pairs=cfg.stability_pairs,
                                strengths=list(cfg.stability_strengths), seed=cfg.seed)  # fmt: skip
            metrics.update(stability.metrics)
    if "analytics" in protocols:
        analyse = _optional("ssroute.eval.analytics", "routing_analytics")
        if analyse is None:
            skipped["analytics"] = "ssroute.eval.analytics is not in this checkout"
        else:
            with torch.no_grad():
                analytics = analyse(
                    backbone, augment.normalize(images.to(device)), labels.to(device) if data.labeled else None, data.num_classes
                )
            metrics.update(analytics.metrics)
    plots: list[Path] = []
    if "plots" in protocols:
        write_all_plots = _optional("ssroute.eval.plots", "write_all_plots")
        if write_all_plots is None:
            skipped["plots"] = "ssroute.eval.plots is not in this checkout"
        else:
            plots = list(write_all_plots(out_dir / "plots", backbone=backbone, images_uint8=images.to(device), normalize=augment.normalize,
                                         augment=augment, analytics=analytics, stability=stability, probes=probes))  # fmt: skip
    metrics["eval_time_s"] = round(time.perf_counter() - start, 2)
    write_json_atomic(out_dir / "metrics.json", metrics)
    relative = [p.relative_to(out_dir) if p.is_relative_to(out_dir) else p for p in plots]
    report = render_report(metrics, relative, run_config, run=str(run_dir), skipped=skipped)
    (out_dir / "report.md").write_text(report)
    return Evaluation(out_dir, metrics, plots, skipped)


def labelled_protocols(cfg: DictConfig, protocols: list[str], backbone: torch.nn.Module, augment: ViewAugment, data) -> dict[str, float]:
    """kNN, linear, few-shot, retrieval and per-block probes from one forward pass over each split."""
    device = next(backbone.parameters()).device
    embed = lambda images: stacked_features(backbone, augment.normalize(images))  # noqa: E731
    with torch.inference_mode():
        train_x, train_y, _ = extract(embed, eval_loader(data.probe_train, cfg.batch_size), device)
        test_x, test_y, _ = extract(embed, eval_loader(data.test, cfg.batch_size), device)
    train_x, train_y, test_x, test_y = train_x.cpu(), train_y.cpu(), test_x.cpu(), test_y.cpu()
    final, final_test = train_x[:, 0], test_x[:, 0]  # the backbone's own features; [:, 1:] are the blocks
    metrics: dict[str, float] = {}
    if "knn" in protocols:
        metrics["knn_top1"] = knn_accuracy(final, train_y, final_test, test_y, cfg.knn_k, cfg.knn_temperature)
    if "linear" in protocols:
        metrics["linear_top1"] = linear_probe_accuracy(final, train_y, final_test, test_y, seed=cfg.seed)
    if "fewshot" in protocols and cfg.fewshot_shots:
        metrics.update(fewshot_accuracy(final, train_y, final_test, test_y, list(cfg.fewshot_shots), cfg.fewshot_draws, cfg.seed))
    if "retrieval" in protocols:
        metrics.update(retrieval_metrics(final_test, test_y, final, train_y))
    if "block_probes" in protocols:
        metrics.update(block_probes(train_x[:, 1:], train_y, test_x[:, 1:], test_y, k=cfg.knn_k, temperature=cfg.knn_temperature,
                                    linear=cfg.block_linear, seed=cfg.seed))  # fmt: skip
    return metrics


def default_config() -> DictConfig:
    from ssroute.config import EvaluateConfig

    return OmegaConf.structured(EvaluateConfig)


RUN_KEYS_SKIPPED = ("block",)  # per-block and nested keys stay in eval/metrics.json only


def evaluate_run(run_dir: Path) -> Evaluation:
    """The end-of-training evaluation: defaults of EvaluateConfig into ``<run>/eval``, headline keys merged into the run's metrics.json as ``eval/<key>``."""
    cfg = default_config()
    cfg.checkpoint = str(run_dir)
    result = evaluate_checkpoint(cfg)
    run_metrics_file = run_dir / "metrics.json"
    run_metrics = json.loads(run_metrics_file.read_text())
    headline = {f"eval/{k}": v for k, v in result.metrics.items() if not k.startswith(RUN_KEYS_SKIPPED) and isinstance(v, int | float)}
    write_json_atomic(run_metrics_file, {**run_metrics, **headline})
    log.info("evaluation written to %s", result.out_dir)
    return result


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
