"""Routing over depth measured: per image vs per token, linear vs GRU router, with and without identity blocks.

Each setting is trained supervised from scratch (``python -m finetune``, the
protocol of docs/depth_routing.md: the router learns from the loss the accuracy
is measured on) at a fixed budget, then ``python -m ssroute.evaluate
protocols=[depth,plots]`` writes the depth analyses and plots into the run's
``eval/`` folder (layer-order and co-selection matrices, identity use per path,
instance-wise paths), and the training log's identity share gives the
identity-over-training plot. A dense ViT of the same sizes is the reference.

    python benchmarks/depth_routing.py            # Fashion-MNIST, 10k training images, 3 epochs, seed 0
    python benchmarks/depth_routing.py --quick    # digits, 1 epoch, two settings: a smoke run

Runs go to ``--runs`` (default ``runs/depth_routing``); a run with a
``metrics.json`` is reused. Writes ``benchmarks/results/depth_routing.{json,md}``
(``--quick``: ``depth_routing_quick``) and copies the plots of every setting to
``benchmarks/results/depth_routing/<setting>/``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
DEPTH = "model.depth_router"
SETTINGS = {  # name -> overrides of python -m finetune
    "dense": ["model=vit_tiny"],
    "image_linear": ["model=vit_depth"],
    "image_gru": ["model=vit_depth", f"{DEPTH}.kind=gru"],
    "image_linear_no_identity": ["model=vit_depth", f"{DEPTH}.identity_blocks=0"],
    "token_linear": ["model=vit_depth", f"{DEPTH}.per_token=true"],
    "token_gru": ["model=vit_depth", f"{DEPTH}.per_token=true", f"{DEPTH}.kind=gru"],
    "token_linear_no_identity": ["model=vit_depth", f"{DEPTH}.per_token=true", f"{DEPTH}.identity_blocks=0"],
}
COLUMNS = [
    ("test_top1", "test top-1"),
    ("depth/blocks_per_image", "blocks / path"),
    ("depth/identity_share", "identity share"),
    ("depth/identity_paths", "paths using an identity"),
    ("depth/compute_saved", "compute saved"),
    ("params_total", "params"),
    ("depth/params_pool", "pool params"),
    ("depth/params_router", "router params"),
    ("depth/params_dense_blocks", "dense blocks' params"),
    ("train_time_s", "train s"),
]


def run_setting(name: str, overrides: list[str], args: argparse.Namespace) -> Path:
    run = args.runs / name
    if not (run / "metrics.json").is_file():
        command = [sys.executable, "-m", "finetune", f"data={args.data}", f"trainer.max_epochs={args.epochs}", "layer_decay=1.0",
                   f"seed={args.seed}", "evaluate=false", "trainer.progress_bar=false", "trainer.knn_every_n_epochs=0",
                   f"hydra.run.dir={run}", *overrides]  # fmt: skip
        if args.subset:
            command.append(f"data.train_subset={args.subset}")
        print(" ".join(command[1:]), flush=True)
        subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    if name != "dense" and not (run / "eval" / "plots" / "depth_paths.png").is_file():
        command = [
            sys.executable,
            "-m",
            "ssroute.evaluate",
            f"checkpoint={run}",
            "protocols=[depth,plots]",
            f"max_routing_images={args.max_images}",
        ]
        subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return run


def collect(name: str, run: Path) -> dict:
    from ssroute.eval.depth_plots import plot_identity_over_training

    metrics = json.loads((run / "metrics.json").read_text())
    evaluated = run / "eval" / "metrics.json"
    if evaluated.is_file():
        metrics = {**metrics, **{k: v for k, v in json.loads(evaluated.read_text()).items() if k.startswith("depth/")}}
    if name != "dense":
        target = RESULTS / "depth_routing" / name
        target.mkdir(parents=True, exist_ok=True)
        for plot in (run / "eval" / "plots").glob("depth_*.png"):
            shutil.copyfile(plot, target / plot.name)
        plot_identity_over_training(target / "depth_identity_over_training.png", run / "logs" / "metrics.csv")
    return metrics


def markdown(results: dict[str, dict], meta: dict) -> str:
    from ssroute.models.depth_stats import order_table

    lines = ["# Routing over depth", "", f"`{meta['command']}` — {meta['budget']}; {meta['machine']}.", ""]
    lines += ["| setting | " + " | ".join(t for _, t in COLUMNS) + " |", "| --- |" + " ---: |" * len(COLUMNS)]
    for name, m in results.items():
        cells = ["–" if m.get(k) is None else (f"{m[k]:,.0f}" if "params" in k else f"{m[k]:.3f}") for k, _ in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    for name, m in results.items():
        if name == "dense":
            continue
        pairs = sorted(((v, k.split("/", 2)[2]) for k, v in m.items() if k.startswith("depth/coselect/")), reverse=True)[:4]
        lines += [f"## {name}", "", "Layer-order matrix (share of paths per step):", "", order_table(m), ""]
        lines += ["Most frequent pairs on one path (diagonal removed): " + ", ".join(f"{p} {v:.2f}" for v, p in pairs), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="fashion_mnist")
    parser.add_argument("--subset", type=int, default=10000, help="data.train_subset (0 = every training image)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-images", type=int, default=1000, help="held-out images of the depth statistics")
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS))
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "depth_routing")
    parser.add_argument("--quick", action="store_true", help="digits, 1 epoch, image_linear and token_gru")
    args = parser.parse_args()
    name = "depth_routing"
    if args.quick:
        args.data, args.subset, args.epochs, args.max_images, args.settings = "digits", 0, 1, 128, ["image_linear", "token_gru"]
        args.runs, name = args.runs.with_name(args.runs.name + "_quick"), "depth_routing_quick"
    start = time.time()
    results = {s: collect(s, run_setting(s, SETTINGS[s], args)) for s in args.settings}
    budget = f"data={args.data}" + (f" data.train_subset={args.subset}" if args.subset else "") + f" trainer.max_epochs={args.epochs}"
    meta = {
        "command": "python benchmarks/depth_routing.py" + (" --quick" if args.quick else ""),
        "budget": f"python -m finetune (supervised from scratch) {budget} layer_decay=1.0 seed={args.seed}, one seed; "
        f"depth statistics on {args.max_images} test images",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs shared with other jobs, no GPU",
        "wall_time_s": round(time.time() - start, 1),
        "settings": {s: SETTINGS[s] for s in args.settings},
    }
    from ssroute.io import atomic_open, write_json_atomic

    write_json_atomic(RESULTS / f"{name}.json", {"meta": meta, "results": results})
    with atomic_open(RESULTS / f"{name}.md") as handle:
        handle.write(markdown(results, meta))
    print(markdown(results, meta))


if __name__ == "__main__":
    main()
