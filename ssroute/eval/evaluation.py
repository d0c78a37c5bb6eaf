"""Evaluate a backbone: frozen-feature protocols, routing stability, analytics, plots and a report.

The one evaluation path: ``python -m ssroute.evaluate`` (a checkpoint on disk)
and the end of every pretraining and fine-tuning run (the backbone in memory)
both call :func:`evaluate_backbone`. Protocols (:data:`PROTOCOLS`):

- labelled, on frozen features of the held-out split against the labelled train
  split: weighted kNN (``ssroute.eval.knn``), linear probe (``ssroute.eval.linear``),
  few-shot (``ssroute.eval.fewshot``), retrieval precision@1 and MAP@R
  (``ssroute.eval.retrieval``), kNN / linear at every block (``ssroute.eval.probes``)
  and linear CKA between consecutive blocks (``ssroute.eval.cka``);
- routing, on up to ``max_routing_images`` held-out images of an MoE model:
  agreement of corresponding patches under the run's augmentation on the
  executed experts (``agreement``), the same by augmentation family and over
  strength (``stability``), analytics (``analytics``, with how alike the experts'
  outputs are: ``ssroute.eval.expert_similarity``), and whether routing
  follows content or position (``position``);
- ``depth`` (routing over depth): the layer-order matrix and identity use;
- ``plots`` (``ssroute.eval.plots``); with an output folder, always ``report.md``.

:data:`RUN_PROTOCOLS` are what a run measures at its end even with
``evaluate=false`` (the keys of its ``metrics.json``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssroute.data.views import ViewAugment
from ssroute.errors import ConfigError
from ssroute.eval.cka import linear_cka
from ssroute.eval.features import eval_loader, evaluating, extract
from ssroute.eval.fewshot import fewshot_accuracy
from ssroute.eval.knn import knn_accuracy
from ssroute.eval.linear import linear_probe_accuracy
from ssroute.eval.probes import block_probes, stacked_features
from ssroute.eval.report import render_report
from ssroute.eval.retrieval import retrieval_metrics
from ssroute.io import write_json_atomic
from ssroute.models.depth_router import depth_stack
from ssroute.moe import moe_layers

log = logging.getLogger(__name__)

LABELLED = ("knn", "linear", "fewshot", "retrieval", "block_probes", "cka")  # need labelled train and held-out images
ROUTING = ("agreement", "stability", "analytics", "position")  # need an MoE layer
PROTOCOLS = (*LABELLED, *ROUTING, "depth", "plots")
RUN_PROTOCOLS = ("knn", "linear", "cka", "agreement", "position", "depth")  # measured at the end of every run


@dataclass
class Evaluation:
    """What one evaluation measured (and wrote, with an output folder)."""

    out_dir: Path | None  # the evaluation folder, None when nothing was written
    metrics: dict[str, Any]  # flat metrics (metrics.json)
    plots: list[Path] = field(default_factory=list)  # PNG files written under out_dir/plots
    skipped: dict[str, str] = field(default_factory=dict)  # protocol -> why it did not run


def choose_protocols(
    requested: Sequence[str] | None, labelled: bool, routed: bool, data_name: str, depth_routed: bool = False
) -> tuple[list[str], dict[str, str]]:
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
        elif name == "depth" and not depth_routed:
            skipped[name] = "no routing over depth"
    chosen = [p for p in (requested if requested is not None else PROTOCOLS) if p not in skipped]
    return chosen, skipped


def held_out_images(data, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``limit`` held-out images (uint8) and labels: the test split, or the train split without one."""
    split = data.test if data.test is not None else data.train
    count = len(split) if limit is None else min(limit, len(split))
    if split.images is not None:
        return split.images[:count], split.labels[:count]
    return torch.stack([split[i][0] for i in range(count)]), split.labels[:count]


def evaluate_backbone(
    backbone: nn.Module,
    data,
    augment_cfg,
    cfg,
    *,
    protocols: Sequence[str] | None = None,
    out_dir: Path | None = None,
    run_config: dict[str, Any] | None = None,
    run: str = "",
    data_name: str | None = None,
) -> Evaluation:
    """Run ``protocols`` (None: every one the data and model support) on ``backbone`` and ``data``.

    Args:
        backbone: the model; its mode is restored afterwards.
        data: a :class:`~ssroute.data.DataBundle` (held-out split: ``data.test``).
        augment_cfg: the run's ``data.augment`` (what agreement is measured under).
        cfg: an :class:`ssroute.config.EvaluateConfig` (probe settings, pairs, image counts, seed).
        out_dir: write ``metrics.json``, ``plots/`` and ``report.md`` there (None: nothing is written).
        run_config: the run's config, for the report's header.
        run: the run's name in the report.
        data_name: the dataset's config name (``data=...``) for messages; default ``data.name``.
    """
    start = time.perf_counter()
    routed = bool(moe_layers(backbone))
    depth_routed = depth_stack(backbone) is not None
    labelled = data.labeled and data.test is not None
    chosen, skipped = choose_protocols(protocols, labelled, routed, data_name or data.name, depth_routed)
    if out_dir is None and "plots" in chosen:
        chosen.remove("plots")
    device = next(backbone.parameters()).device
    augment = ViewAugment(augment_cfg, data.channels, data.image_size, data.mean, data.std).to(device)
    metrics: dict[str, Any] = {
        "data": data.name,
        "num_train": len(data.probe_train),
        "num_test": len(data.test) if data.test is not None else 0,
        "held_out": data.held_out,  # test, or val (data.val_fraction): which split the probes and routing metrics scored
    }
    probes: dict[str, float] = {}
    if any(p in LABELLED for p in chosen):
        metrics.update(labelled_protocols(cfg, chosen, backbone, augment, data))
        probes = {k: v for k, v in metrics.items() if k.startswith("block")}
    images, labels = held_out_images(data, cfg.max_routing_images)
    images = images.to(device)
    stability = analytics = None
    if ("agreement" in chosen or "stability" in chosen) and cfg.stability_pairs > 0:
        from ssroute.eval.stability import augmentation_stability

        full = "stability" in chosen
        stability = augmentation_stability(
            backbone, augment_cfg, augment.normalize, images, pairs=cfg.stability_pairs,
            strengths=list(cfg.stability_strengths) if full else [], seed=cfg.seed, families=full,
        )  # fmt: skip
        metrics.update(stability.metrics)
    if "analytics" in chosen:
        from ssroute.eval.analytics import routing_analytics

        analytics = routing_analytics(backbone, augment.normalize(images), labels.to(device) if data.labeled else None, data.num_classes)
        metrics.update(analytics.metrics)
        from ssroute.eval.expert_similarity import expert_similarity

        metrics.update(expert_similarity(backbone, augment.normalize(images)))
    if "position" in chosen:
        from ssroute.eval.position import position_metrics

        metrics.update(position_metrics(backbone, augment.normalize, images))
    if "depth" in chosen:
        metrics.update(depth_metrics(backbone, augment.normalize(images)))
    plots: list[Path] = []
    if "plots" in chosen:
        from ssroute.eval.plots import write_all_plots

        plots = list(write_all_plots(out_dir / "plots", backbone=backbone, images_uint8=images, normalize=augment.normalize,
                                     augment=augment, analytics=analytics, stability=stability, probes=probes))  # fmt: skip
        if depth_routed:
            from ssroute.eval.depth_plots import write_depth_plots

            plots += write_depth_plots(out_dir / "plots", backbone, augment.normalize(images), images)
    metrics["eval_time_s"] = round(time.perf_counter() - start, 2)
    if out_dir is not None:
        write_json_atomic(out_dir / "metrics.json", metrics)
        relative = [p.relative_to(out_dir) if p.is_relative_to(out_dir) else p for p in plots]
        (out_dir / "report.md").write_text(render_report(metrics, relative, run_config or {}, run=run, skipped=skipped))
    return Evaluation(out_dir, metrics, plots, skipped)


def labelled_protocols(cfg, protocols: list[str], backbone: nn.Module, augment: ViewAugment, data) -> dict[str, float]:
    """kNN, linear, few-shot, retrieval, per-block probes and CKA from one forward pass over each split."""
    device = next(backbone.parameters()).device
    embed = lambda images: stacked_features(backbone, augment.normalize(images))  # noqa: E731
    with evaluating(backbone):
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
    if "cka" in protocols:
        for i in range(1, test_x.shape[1] - 1):  # consecutive blocks' pooled outputs on the held-out images
            metrics[f"cka/block{i - 1}_block{i}"] = linear_cka(test_x[:, i], test_x[:, i + 1])
    return metrics


def depth_metrics(backbone: nn.Module, images: torch.Tensor, batch_size: int = 512) -> dict[str, float]:
    """``depth/*`` statistics of routing over depth on ``images`` (normalised): the layer-order and co-selection
    matrices, identity use and the parameter counts against the dense ViT of the same depth."""
    from ssroute.eval.depth_plots import depth_stats_of
    from ssroute.models.depth_stats import depth_parameters

    stats, _ = depth_stats_of(backbone, images, batch_size)
    stack = depth_stack(backbone)
    return {**stats.summary(stack.names, order=True), **depth_parameters(stack)}
