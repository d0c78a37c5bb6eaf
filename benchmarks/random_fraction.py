"""Random routing, a little vs too much: accuracy and specialisation as ``router.random_fraction`` goes from 0 to 1.

The research notes: "Random routing hurts performance (sometimes), but too much
destroys performance... why?". For each fraction ``p`` and seed this pretrains
the default recipe (``python -m pretrain``, the routed block's router with
``router.random_fraction=p``) at a fixed budget, then evaluates each run twice
on the held-out split:

- ``as trained``: the router keeps sending a share ``p`` of tokens to random
  experts at evaluation too (what ``router=random`` does at ``p = 1``); kNN,
  linear, agreement and usage are the run's own end-of-run values;
- ``learned only``: the same weights with ``random_fraction=0`` at evaluation,
  so only what training did to the model differs.

Per evaluation: kNN and linear-probe top-1, routing agreement under the run's
augmentation (on the executed experts) and its chance level, expert usage
entropy, the busiest expert's share of the load, the class x expert NMI, and
how alike the experts' outputs are (``ssroute.eval.expert_similarity``).
The table gives the mean over seeds and the spread (max - min).

    python benchmarks/random_fraction.py                       # Fashion-MNIST 10k, 3 epochs, p in 0 .. 1, seeds 0 1
    python benchmarks/random_fraction.py --quick               # digits, 1 epoch, p in 0 1, one seed: a smoke run

Runs go to ``--runs`` (default ``runs/random_fraction``); a run with a
``metrics.json`` is reused, so an interrupted sweep resumes. Writes
``benchmarks/results/random_fraction.{json,md}`` (``--quick``: ``random_fraction_quick``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
PROTOCOLS = ["knn", "linear", "agreement", "analytics"]
COLUMNS = [  # (metrics.json key, column title)
    ("linear_top1", "linear"),
    ("knn_top1", "kNN"),
    ("routing_agreement", "agreement"),
    ("routing_agreement_chance", "chance"),
    ("expert_usage_entropy", "usage entropy"),
    ("load_max_share", "max load share"),
    ("class_expert_nmi", "class x expert NMI"),
    ("expert_output_cosine", "expert cosine"),
    ("expert_output_cka", "expert CKA"),
]


def pretrain(run: Path, fraction: float, seed: int, args: argparse.Namespace) -> None:
    if (run / "metrics.json").is_file():
        return
    command = [
        sys.executable,
        "-m",
        "pretrain",
        f"data={args.data}",
        f"trainer.max_epochs={args.epochs}",
        f"router.random_fraction={fraction}",
        f"seed={seed}",
        "evaluate=false",
        "trainer.progress_bar=false",
        "trainer.knn_every_n_epochs=0",
        "trainer.fluctuation_every_n_steps=0",
        f"hydra.run.dir={run}",
        *args.override,
    ]  # fmt: skip  (measuring during training is off: it never changes the run)
    if args.subset:
        command.append(f"data.train_subset={args.subset}")
    print(" ".join(command[1:]), flush=True)
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def block_mean(metrics: dict, name: str) -> float | None:
    """A statistic's value: the run-level key, else the mean over ``block{i}/name`` keys."""
    if name in metrics:
        return float(metrics[name])
    values = [float(v) for k, v in metrics.items() if k.startswith("block") and k.split("/", 1)[-1] == name]
    return sum(values) / len(values) if values else None


def evaluate(run: Path, max_images: int, fraction: float) -> dict[str, dict[str, float | None]]:
    """``{"as_trained": {...}, "learned_only": {...}}`` for one run. As trained, kNN, linear, agreement and usage are the
    run's own end-of-run values (measured with its random share on); the analytics are measured here."""
    import torch
    from omegaconf import OmegaConf

    from ssroute.checkpoint import load_backbone, load_pretrained, resolve_checkpoint
    from ssroute.config import EvaluateConfig
    from ssroute.data import build_data
    from ssroute.eval.evaluation import evaluate_backbone
    from ssroute.moe import moe_layers

    file = resolve_checkpoint(str(run))
    config, _ = load_pretrained(str(file))
    data_cfg = OmegaConf.create(config["data"])
    data = build_data(data_cfg, config.get("seed", 0))
    backbone, _, _ = load_backbone(str(file), data)
    cfg = OmegaConf.structured(EvaluateConfig(max_routing_images=max_images))
    own = json.loads((run / "metrics.json").read_text())
    torch.manual_seed(0)  # the random share's draws at evaluation
    metrics = {**own, **evaluate_backbone(backbone, data, data_cfg.augment, cfg, protocols=["analytics"]).metrics}
    out = {"as_trained": {key: block_mean(metrics, key) for key, _ in COLUMNS}}
    if fraction == 0:  # nothing random to switch off
        return {**out, "learned_only": dict(out["as_trained"])}
    for layer in moe_layers(backbone).values():
        layer.router.set_random_fraction(0.0)
    metrics = evaluate_backbone(backbone, data, data_cfg.augment, cfg, protocols=PROTOCOLS).metrics
    return {**out, "learned_only": {key: block_mean(metrics, key) for key, _ in COLUMNS}}


def summarise(values: list[float | None]) -> dict[str, float | None]:
    known = [v for v in values if v is not None]
    if not known:
        return {"mean": None, "spread": None}
    return {"mean": statistics.fmean(known), "spread": max(known) - min(known)}


def markdown(table: dict, meta: dict) -> str:
    lines = [
        "# Random routing fraction",
        "",
        f"`{meta['command']}` — {meta['budget']}; {meta['machine']}. "
        f"Mean over seeds {meta['seeds']} (± spread = max - min). `as trained`: the share p is random at evaluation too; "
        "`learned only`: the same weights evaluated with random_fraction=0.",
        "",
    ]
    for setting in ("as_trained", "learned_only"):
        lines += [
            f"## {setting.replace('_', ' ')}",
            "",
            "| p | " + " | ".join(t for _, t in COLUMNS) + " |",
            "| ---: |" + " ---: |" * len(COLUMNS),
        ]
        for fraction, row in table.items():
            cells = []
            for key, _ in COLUMNS:
                s = row[setting][key]
                cells.append("–" if s["mean"] is None else f"{s['mean']:.3f} ± {s['spread']:.3f}")
            lines.append(f"| {fraction} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.1, 0.25, 0.5, 1.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--data", default="fashion_mnist")
    parser.add_argument("--subset", type=int, default=10000, help="data.train_subset (0 = every training image)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-images", type=int, default=1000, help="held-out images of the routing measurements")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "random_fraction")
    parser.add_argument("--override", nargs="*", default=[], help="extra pretraining overrides, e.g. router=expert_choice")
    parser.add_argument("--quick", action="store_true", help="digits, 1 epoch, p in {0, 1}, seed 0")
    args = parser.parse_args()
    name = "random_fraction"
    if args.quick:
        args.fractions, args.seeds, args.data, args.subset, args.epochs, args.max_images = [0.0, 1.0], [0], "digits", 0, 1, 256
        args.runs, name = args.runs.with_name(args.runs.name + "_quick"), "random_fraction_quick"
    start = time.time()
    per_run = {}
    for fraction in args.fractions:
        for seed in args.seeds:
            run = args.runs / f"p{fraction}_seed{seed}"
            pretrain(run, fraction, seed, args)
            run_metrics = json.loads((run / "metrics.json").read_text())
            per_run[(fraction, seed)] = {**evaluate(run, args.max_images, fraction), "train_time_s": run_metrics.get("train_time_s")}
            print(f"p={fraction} seed={seed}: {per_run[(fraction, seed)]['as_trained']}", flush=True)
    table = {
        fraction: {
            setting: {key: summarise([per_run[(fraction, s)][setting][key] for s in args.seeds]) for key, _ in COLUMNS}
            for setting in ("as_trained", "learned_only")
        }
        for fraction in args.fractions
    }
    budget = f"data={args.data}" + (f" data.train_subset={args.subset}" if args.subset else "") + f" trainer.max_epochs={args.epochs}"
    meta = {
        "command": "python benchmarks/random_fraction.py" + (" --quick" if args.quick else ""),
        "budget": f"default recipe, {budget} {' '.join(args.override)}".strip()
        + f", evaluation on {args.max_images} held-out images for routing",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs shared with other jobs, no GPU",
        "seeds": args.seeds,
        "wall_time_s": round(time.time() - start, 1),
    }
    runs = {f"p{f}_seed{s}": v for (f, s), v in per_run.items()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    from ssroute.io import atomic_open, write_json_atomic

    write_json_atomic(RESULTS / f"{name}.json", {"meta": meta, "table": {str(f): v for f, v in table.items()}, "runs": runs})
    with atomic_open(RESULTS / f"{name}.md") as handle:
        handle.write(markdown(table, meta))
    print(markdown(table, meta))


if __name__ == "__main__":
    main()
