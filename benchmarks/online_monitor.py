"""The online monitor's share of training time (target: at most 10% by default).

Runs ``python -m pretrain`` as a user would and reads the run's own
``metrics.json``: ``train_time_s`` (time in training steps) and
``monitor_time_s`` (time in the online monitor — kNN on a fixed subset and
routing agreement — and the routing-fluctuation snapshots, all measured while
training). The share is ``monitor_time_s / train_time_s``. The end-of-run
evaluation is not measuring-while-training and is reported apart (wall time
minus the two).

Cases: the digits default run (``python -m pretrain``, the README's command)
and a Fashion-MNIST run on a 10,000-image subset (``--fashion-epochs`` epochs);
``--every-epoch`` also runs each with the monitor every epoch, the old default,
for comparison.

    python benchmarks/online_monitor.py --threads 2
    python benchmarks/online_monitor.py --threads 1 --digits-epochs 30 --fashion-epochs 3

Writes ``benchmarks/results/online_monitor.json`` and ``benchmarks/results/online_monitor.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import machine, write_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TARGET = 0.10


def run_case(overrides: list[str], threads: int, out_dir: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    command = [
        sys.executable,
        "-m",
        "pretrain",
        *overrides,
        f"trainer.threads={threads}",
        "trainer.progress_bar=false",
        f"hydra.run.dir={out_dir}",
    ]
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - start
    m = json.loads((out_dir / "metrics.json").read_text())
    return {
        "overrides": overrides,
        "wall_s": round(wall, 1),
        "train_time_s": m["train_time_s"],
        "monitor_time_s": m["monitor_time_s"],
        "share": m["monitor_time_s"] / m["train_time_s"],
        "rest_s": round(wall - m["train_time_s"] - m["monitor_time_s"], 1),  # imports, data, end-of-run evaluation, checkpoints
        "epochs": m["epochs"],
        "knn_top1": m.get("knn_top1"),
    }


def markdown(report: dict) -> str:
    lines = [
        "# Online monitor share of training time",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {report['machine']['cpu']} ({report['machine']['cores']} cores, shared with other jobs: 1-min load average "
        f"{report['loadavg_1min_before_after'][0]:.2f} -> {report['loadavg_1min_before_after'][1]:.2f}), torch {report['machine']['torch']}, "
        f"{report['threads']} intra-op thread(s). monitor = online kNN + routing agreement + routing-fluctuation snapshots while "
        "training; rest = wall minus training steps minus monitor (imports, data, checkpoints, end-of-run evaluation).",
        "",
        "| case | overrides | epochs | train steps s | monitor s | monitor / train | rest s | wall s | <= 10% | measured by |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | :---: | --- |",
    ]
    for name, r in report["results"].items():
        ok = "yes" if r["share"] <= TARGET else "no"
        lines.append(
            f"| {name} | `{' '.join(r['overrides']) or '(defaults)'}` | {r['epochs']} | {r['train_time_s']:.1f} | {r['monitor_time_s']:.1f} | "
            f"{100 * r['share']:.1f}% | {r['rest_s']:.1f} | {r['wall_s']:.1f} | {ok} | {r.get('command', 'this command')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads per run (trainer.threads)")
    parser.add_argument("--digits-epochs", type=int, default=None, help="digits budget; default = the dataset's (the README run)")
    parser.add_argument("--fashion-epochs", type=int, default=5, help="Fashion-MNIST (10,000-image subset) budget; 0 = skip")
    parser.add_argument("--every-epoch", action="store_true", help="also run each case with trainer.knn_every_n_epochs=1")
    parser.add_argument(
        "--only", choices=["all", "fashion"], default="all", help="fashion: re-run that case only, keep the others' results"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    cases = {"digits default": [] if args.digits_epochs is None else [f"trainer.max_epochs={args.digits_epochs}"]}
    previous = {}
    if args.only == "fashion":
        cases = {}
        if (args.out / "online_monitor.json").is_file():
            previous = json.loads((args.out / "online_monitor.json").read_text())["results"]
    if args.fashion_epochs:
        cases["fashion_mnist 10k"] = ["data=fashion_mnist", "data.train_subset=10000", f"trainer.max_epochs={args.fashion_epochs}"]
    if args.every_epoch:
        cases |= {f"{name}, monitor every epoch": [*o, "trainer.knn_every_n_epochs=1"] for name, o in list(cases.items())}
    load_before = os.getloadavg()[0]
    results = {name: {**r, "command": r.get("command", "earlier run")} for name, r in previous.items() if not name.startswith("fashion")}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, overrides) in enumerate(cases.items()):
            results[name] = {**run_case(overrides, args.threads, Path(tmp) / str(i)), "command": "this command"}
            print(name, results[name], flush=True)
    report = {
        "command": "python benchmarks/online_monitor.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip(),
        "machine": machine(),
        "threads": args.threads,
        "loadavg_1min_before_after": [load_before, os.getloadavg()[0]],
        "results": results,
    }
    write_results(args.out, "online_monitor", report, markdown(report))


if __name__ == "__main__":
    main()
