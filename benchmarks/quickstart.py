"""Time the README's quick start end to end: ``python -m pretrain`` then ``python -m finetune checkpoint=latest``.

    python benchmarks/quickstart.py [--repeats 1] [--threads N]

Each repeat runs both commands as a new user would (fresh processes, default
settings, into a scratch run folder) and splits the wall time of each with what
the run itself recorded in ``metrics.json``: training steps (``train_time_s``),
the per-epoch online monitor (``monitor_time_s``), the end-of-run evaluation
(``eval_time_s``), and the rest — interpreter start-up, imports, data loading,
checkpoint writing. It also records the accuracy the quick start reached, so a
faster quick start that learns less shows. Writes
``benchmarks/results/quickstart.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent
PARTS = ("train_time_s", "monitor_time_s", "eval_time_s")
QUALITY = ("linear_top1", "knn_top1", "routing_agreement", "routing_agreement_chance", "expert_usage_entropy", "routing_shift_content", "test_top1")


def timed(command: list[str], env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", *command], cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"python -m {' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return time.perf_counter() - start, done.stdout


def run_dir_of(stdout: str) -> Path:
    return Path(next(line.split(":", 1)[1].strip() for line in stdout.splitlines() if line.startswith("run folder:")))


def one_repeat(scratch: Path, env: dict[str, str]) -> dict:
    pre_dir, ft_dir = scratch / "pretrain", scratch / "finetune"
    pre_wall, out = timed(["pretrain", f"hydra.run.dir={pre_dir}"], env)
    pre = json.loads((run_dir_of(out) / "metrics.json").read_text())
    ft_wall, out = timed(["finetune", f"checkpoint={pre_dir}", f"hydra.run.dir={ft_dir}"], env)
    ft = json.loads((run_dir_of(out) / "metrics.json").read_text())
    row = {"total_s": pre_wall + ft_wall}
    for name, wall, metrics in (("pretrain", pre_wall, pre), ("finetune", ft_wall, ft)):
        parts = {part: float(metrics.get(part, 0.0)) for part in PARTS}
        row[name] = {"wall_s": wall, **parts, "startup_and_rest_s": wall - sum(parts.values())}
        row[name].update({k: metrics[k] for k in QUALITY if k in metrics})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the runs (default: as a user's shell has it)")
    args = parser.parse_args()
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    rows = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as scratch:
            rows.append(one_repeat(Path(scratch), env))
    median = lambda values: statistics.median(values)  # noqa: E731
    summary = {
        "total_s": median([r["total_s"] for r in rows]),
        **{f"{stage}/{key}": median([r[stage][key] for r in rows]) for stage in ("pretrain", "finetune") for key in rows[0][stage]},
    }
    meta = {
        "command": "python -m pretrain && python -m finetune checkpoint=latest",
        "benchmark": "python benchmarks/quickstart.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores" + (f", OMP_NUM_THREADS={args.threads}" if args.threads else ""),
        "repeats": args.repeats,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quickstart.json").write_text(json.dumps({"meta": meta, "median": summary, "repeats": rows}, indent=2) + "\n")
    lines = [
        "# Quick start time",
        "",
        f"`{meta['command']}`, timed by `{meta['benchmark'].strip()}` ({meta['machine']}; median of {args.repeats}).",
        "",
        "| run | wall s | training steps s | online monitor s | end-of-run evaluation s | start-up and the rest s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for stage in ("pretrain", "finetune"):
        cells = [summary[f"{stage}/{k}"] for k in ("wall_s", *PARTS, "startup_and_rest_s")]
        lines.append(f"| {stage} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    lines += [f"| **both** | **{summary['total_s']:.1f}** | | | | |", ""]
    quality = [f"{k} {summary[f'pretrain/{k}']:.3f}" for k in QUALITY if f"pretrain/{k}" in summary]
    lines.append("Reached: pretraining " + ", ".join(quality) + (f"; fine-tuned test_top1 {summary['finetune/test_top1']:.3f}." if "finetune/test_top1" in summary else "."))
    (RESULTS / "quickstart.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
