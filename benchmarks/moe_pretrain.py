"""Routed pretraining throughput against the dense stack at equal active parameters.

Runs ``python -m pretrain`` with ``model.stack=[ssl,route,ssl]`` (the routing
block's FFN is an MoE layer, k=1, each expert as wide as the dense FFN) and
with ``model.stack=[ssl,dense,ssl]`` (the same block with a dense FFN), the
same schedule and budget otherwise, alternating routed and dense runs so a
load change on a shared machine hits both alike. Each run is its own process,
as a user would start it; the throughput is the run's own ``images_per_s``
(training images over the time spent in training steps, so start-up, the
online monitor and the final evaluation are not in it). The ratio reported is
the median routed run over the median dense run.

    python benchmarks/moe_pretrain.py                      # digits, end_to_end, 15 epochs, 3 pairs
    python benchmarks/moe_pretrain.py --threads 2 --pairs 5 --extra router=vq

Writes ``benchmarks/results/moe_pretrain.json`` and ``benchmarks/results/moe_pretrain.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import machine, write_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TARGET = 0.90  # routed images/s >= 0.90x dense


def run_once(stack: str, args: argparse.Namespace, out_dir: Path) -> dict:
    overrides = [
        f"model.stack={stack}",
        f"schedule={args.schedule}",
        f"trainer.max_epochs={args.epochs}",
        f"trainer.threads={args.threads}",
        "trainer.progress_bar=false",
        "trainer.knn_every_n_epochs=0",
        "trainer.fluctuation_every_n_steps=0",
        "evaluate=false",
        f"hydra.run.dir={out_dir}",
        *args.extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pretrain", *overrides], cwd=ROOT, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - start
    metrics = json.loads((out_dir / "metrics.json").read_text())
    return {
        "images_per_s": metrics["images_per_s"],
        "train_time_s": metrics["train_time_s"],
        "wall_s": round(wall, 1),
        "threads": metrics.get("threads"),
    }


def markdown(report: dict) -> str:
    s, r = report["settings"], report["results"]
    ratio = r["ratio_routed_over_dense"]
    lines = [
        "# Routed pretraining throughput",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {report['machine']['cpu']} ({report['machine']['cores']} cores), torch {report['machine']['torch']}, "
        f"{s['threads']} intra-op thread(s) per run; digits, `schedule={s['schedule']}`, {s['epochs']} epochs, "
        f"{s['pairs']} alternating routed/dense pairs; extra overrides: {' '.join(s['extra']) or 'none'}. "
        "images/s counts training steps only (no start-up, monitor or evaluation). "
        f"1-min load average {report['loadavg_1min_before_after'][0]:.2f} -> {report['loadavg_1min_before_after'][1]:.2f}.",
        "",
        "| stack | images/s per run | median |",
        "| --- | --- | ---: |",
    ]
    for name in ("routed", "dense"):
        per_run = ", ".join(f"{x['images_per_s']:.0f}" for x in r[name])
        lines.append(f"| {name} `{r['stacks'][name]}` | {per_run} | {r[name + '_median']:.0f} |")
    lines += [
        "",
        "| target | measured | met |",
        "| --- | ---: | :---: |",
        f"| routed images/s >= {TARGET:.2f}x dense | {ratio:.2f}x | {'yes' if ratio >= TARGET else 'no'} |",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads per run (trainer.threads)")
    parser.add_argument("--pairs", type=int, default=3, help="routed/dense run pairs, alternating")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--schedule", default="end_to_end")
    parser.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for both stacks, e.g. router=vq")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    stacks = {"routed": "[ssl,route,ssl]", "dense": "[ssl,dense,ssl]"}
    results: dict = {"stacks": stacks, "routed": [], "dense": []}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for pair in range(args.pairs):
            for name, stack in stacks.items():
                run = run_once(stack, args, Path(tmp) / f"{name}{pair}")
                print(name, run, flush=True)
                results[name].append(run)
    for name in stacks:
        results[f"{name}_median"] = statistics.median(x["images_per_s"] for x in results[name])
    results["ratio_routed_over_dense"] = results["routed_median"] / results["dense_median"]
    report = {
        "command": "python benchmarks/moe_pretrain.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip(),
        "machine": machine(),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "loadavg_1min_before_after": [load_before, os.getloadavg()[0]],
        "results": results,
    }
    write_results(args.out, "moe_pretrain", report, markdown(report))


if __name__ == "__main__":
    main()
