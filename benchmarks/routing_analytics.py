"""Routing stability by augmentation family and strength, routing analytics and plots of one pretrained run.

    python benchmarks/routing_analytics.py RUN_DIR [--pairs 8] [--strengths 0 0.25 0.5 1 1.5 2] [--seed 0]

On the held-out images of the run's dataset: ``ssroute.eval.stability.augmentation_stability``
(agreement, JS divergence and chance per block, per augmentation family and over strength),
``ssroute.eval.analytics.routing_analytics`` (load, dropped tokens, co-selection, class x expert,
block x block), per-block kNN accuracy (``ssroute.eval.probes``), and every plot of
``ssroute.eval.plots.write_all_plots`` into ``benchmarks/results/routing_analytics/``.
Writes ``benchmarks/results/routing_analytics.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssroute.checkpoint import load_pretrained, resolve_checkpoint  # noqa: E402
from ssroute.data import build_data  # noqa: E402
from ssroute.data.views import ViewAugment  # noqa: E402
from ssroute.eval.analytics import routing_analytics  # noqa: E402
from ssroute.eval.plots import write_all_plots  # noqa: E402
from ssroute.eval.probes import block_probes, stacked_features  # noqa: E402
from ssroute.eval.stability import FAMILIES, augmentation_stability  # noqa: E402
from ssroute.models import build_backbone  # noqa: E402
from ssroute.train.run import write_json_atomic  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def table(metrics: dict[str, float], blocks: list[str], strengths: list[float]) -> list[str]:
    rows = (
        [("run's augmentation", "")]
        + [(f"only {f}", f"family/{f}/") for f in FAMILIES]
        + [(f"strength {s:g}", f"strength/{s:g}/") for s in strengths]
    )
    lines = ["| views | " + " | ".join(f"{b} agreement | {b} chance | {b} JS" for b in blocks) + " |"]
    lines.append("| --- |" + " ---: | ---: | ---: |" * len(blocks))
    for name, scope in rows:
        cells = [
            f"{metrics[f'{b}/{scope}{m}']:.3f}" for b in blocks for m in ("routing_agreement", "routing_agreement_chance", "routing_js")
        ]
        if scope.startswith("family/") and not metrics[f"{scope}in_run"]:
            name += " (reference magnitude)"
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a python -m pretrain run folder or checkpoint")
    parser.add_argument("--pairs", type=int, default=8, help="rounds of two views per image for each measurement")
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 1.0, 1.5, 2.0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    config, state = load_pretrained(args.run)
    cfg = OmegaConf.create(config)
    data = build_data(cfg.data, cfg.seed)
    backbone = build_backbone(cfg, data.image_size, data.channels)
    backbone.load_state_dict(state)
    backbone.eval()
    augment = ViewAugment(cfg.data.augment, data.channels, data.image_size, data.mean, data.std)
    test = data.test if data.test is not None else data.train
    images, labels = test.images, test.labels

    start = time.perf_counter()
    stability = augmentation_stability(
        backbone, cfg.data.augment, augment.normalize, images, pairs=args.pairs, strengths=args.strengths, seed=args.seed
    )
    stability_s = time.perf_counter() - start
    start = time.perf_counter()
    analytics = routing_analytics(backbone, augment.normalize(images), labels, int(labels.max()) + 1)
    analytics_s = time.perf_counter() - start
    train = data.train
    with torch.no_grad():
        train_blocks = torch.cat([stacked_features(backbone, augment.normalize(c)) for c in train.images.split(512)])[:, 1:]
        test_blocks = torch.cat([stacked_features(backbone, augment.normalize(c)) for c in images.split(512)])[:, 1:]
    probes = block_probes(train_blocks, train.labels, test_blocks, labels, linear=False)
    plots = write_all_plots(
        RESULTS / "routing_analytics",
        backbone=backbone,
        images_uint8=images[:8],
        normalize=augment.normalize,
        augment=augment,
        analytics=analytics,
        stability=stability,
        probes=probes,
    )
    blocks = list(analytics.blocks)
    payload = {
        "run": str(resolve_checkpoint(args.run)),
        "command": "python benchmarks/routing_analytics.py " + " ".join(sys.argv[1:]),
        "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "images": len(images),
        "pairs": args.pairs,
        "stability_s": round(stability_s, 1),
        "analytics_s": round(analytics_s, 1),
        "stability": stability.metrics,
        "curves": stability.curves,
        "analytics": analytics.metrics,
        "probes": probes,
        "plots": [str(p.relative_to(RESULTS)) for p in plots],
    }
    write_json_atomic(RESULTS / "routing_analytics.json", payload)
    lines = [
        "# Routing stability and analytics",
        "",
        f"Run `{payload['run']}`, {len(images)} held-out images, {args.pairs} view pairs per measurement, seed {args.seed}; {payload['machine']}.",
        f"`{payload['command']}` ({stability_s:.0f} s stability, {analytics_s:.1f} s analytics).",
        "",
        *table(stability.metrics, blocks, sorted(args.strengths)),
        "",
        "| analytics | value |",
        "| --- | ---: |",
        *[f"| {k} | {v:.3f} |" for k, v in analytics.metrics.items()],
        "",
        "| probe | accuracy |",
        "| --- | ---: |",
        *[f"| {k} | {v:.3f} |" for k, v in probes.items()],
        "",
    ]
    (RESULTS / "routing_analytics.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
