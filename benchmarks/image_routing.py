"""Mobile V-MoE's routing ablation on our scale: dense vs image vs super-class image vs token routing.

Supervised training from scratch (``python -m finetune`` without a checkpoint), as
in the table of Mobile V-MoE (Daxberger et al. 2023, arXiv 2309.04354, ablation of
the routing input): the same ViT, its MoE blocks ``--moe-layers`` with ``--experts``
experts of the dense FFN's hidden width and k=1, so every variant has the dense
model's active FLOPs plus its router's. Variants, run one after another:

- ``dense``: no MoE block;
- ``image``: ``router=image`` trained end to end;
- ``superclass_image``: ``router=image superclass.weight=1 superclass.checkpoint=<the dense run>``:
  the router also learns the super-class of each image, super-classes being
  k-means clusters of the dense run's class-mean features;
- ``token``: ``router=token_choice`` (capacity factor 1.25).

Writes ``benchmarks/results/image_routing.json`` and ``.md`` (test accuracy,
wall time of training, active and total parameters and FLOPs per token from
``ssroute.moe.accounting``).

    python benchmarks/image_routing.py                        # Fashion-MNIST, 10000 images, 3 epochs
    python benchmarks/image_routing.py --subset 2000 --epochs 1 --data digits   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def run(name: str, overrides: list[str], out: Path) -> dict:
    run_dir = out / name
    command = [sys.executable, "-m", "finetune", *overrides, f"hydra.run.dir={run_dir}"]
    print("$", " ".join(command[1:]), flush=True)
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"name": name, "overrides": overrides, "wall_s": round(wall, 1), **metrics, **accounting(run_dir), "run_dir": str(run_dir)}


def accounting(run_dir: Path) -> dict:
    """Parameters and FLOPs of the run's backbone, built from its config.yaml."""
    from ssroute.data import build_data
    from ssroute.models import build_backbone
    from ssroute.moe.accounting import model_accounting

    cfg = OmegaConf.load(run_dir / "config.yaml")
    data = build_data(cfg.data, cfg.seed)
    backbone = build_backbone(cfg, data.image_size, data.channels)
    stats = model_accounting(backbone, tokens_per_image=backbone.patch_embed.num_tokens)
    return {key: stats[key] for key in ("params_total", "params_active", "flops_per_token")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="fashion_mnist")
    parser.add_argument("--subset", type=int, default=10000, help="training images")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--moe-layers", default="[1,3]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="/tmp/ssroute_image_routing", help="folder for the run folders")
    parser.add_argument("--only", nargs="*", help="run only these variants (dense must exist in --out for superclass_image)")
    args = parser.parse_args()
    out = Path(args.out)
    common = [
        f"data={args.data}", f"data.train_subset={args.subset}", f"trainer.max_epochs={args.epochs}", f"seed={args.seed}",
        "trainer.progress_bar=false", f"model.num_experts={args.experts}", "++evaluate=false",  # only test_top1 is compared
    ]  # fmt: skip
    moe = [f"model.moe_layers={args.moe_layers}"]
    variants = {
        "dense": [],
        "image": [*moe, "router=image"],
        "superclass_image": [*moe, "router=image", "superclass.weight=1", f"superclass.checkpoint={out / 'dense'}"],
        "token": [*moe, "router=token_choice"],
    }
    load_before = os.getloadavg()[0]
    rows = [run(name, [*common, *extra], out) for name, extra in variants.items() if not args.only or name in args.only]
    result = {
        "command": "python benchmarks/image_routing.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "load_average": [load_before, os.getloadavg()[0]],
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "image_routing.json").write_text(json.dumps(result, indent=2) + "\n")
    dense = next((r for r in rows if r["name"] == "dense"), None)
    lines = [
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}; 1-min load average {load_before:.1f} -> {result['load_average'][1]:.1f}",
        "",
        "| routing | test top-1 | vs dense | train wall s | active params | total params | FLOPs / token |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        delta = f"{100 * (r['test_top1'] - dense['test_top1']):+.2f}" if dense else "-"
        lines.append(
            f"| {r['name']} | {100 * r['test_top1']:.2f} | {delta} | {r['train_time_s']:.0f} | "
            f"{r['params_active'] / 1e3:.1f}k | {r['params_total'] / 1e3:.1f}k | {r['flops_per_token'] / 1e3:.1f}k |"
        )
    (RESULTS / "image_routing.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
