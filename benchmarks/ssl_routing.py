"""Self-supervised routing at a fixed budget: does it learn content, stay stable, and beat pixels and dense?

One command runs, per dataset, the table behind the README's headline numbers:

- the default recipe (``python -m pretrain``: SSL -> Routing -> SSL, layerwise,
  routing consistency on) against the same recipe with the consistency loss off,
  trained end to end, and the dense stack at equal active parameters
  (``model.stack=[ssl,dense,ssl]``), each over ``--seeds`` seeds (mean ± std);
- for the default's first seed, routing agreement when the views differ by one
  augmentation family only (``python -m ssroute.evaluate protocols=[stability]``);
- fine-tuning with 1%, 10% and 100% of the labels, from the pretrained model and
  from scratch (the same architecture), first seed;
- raw-pixel baselines on the same split (``benchmarks/raw_pixel_baselines.py``).

    python benchmarks/ssl_routing.py [--datasets digits fashion_mnist] [--seeds 2] [--quick] [--threads 2]

``--quick`` shrinks every budget (digits 30 epochs, Fashion-MNIST 10k images
for 6 epochs) to check the pipeline; the README quotes the full budget. Each
run is a run folder under ``--runs`` (default ``runs/benchmarks/ssl_routing``).
Writes ``benchmarks/results/ssl_routing.{json,md}`` (``ssl_routing_quick.*``
with ``--quick``), with the budget, wall times and the machine.
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

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent

# per dataset and budget: pretraining overrides ([] = the dataset's defaults) and fine-tuning epochs per label
# fraction (fewer labels, more epochs: every fraction gets enough steps for training from scratch to converge)
BUDGETS = {
    "digits": {
        "full": {"pretrain": [], "finetune_epochs": {0.01: 200, 0.1: 120, 1.0: 60}},
        "quick": {"pretrain": ["trainer.max_epochs=30"], "finetune_epochs": {0.01: 40, 0.1: 30, 1.0: 20}},
    },
    "fashion_mnist": {
        "full": {"pretrain": [], "finetune_epochs": {0.01: 60, 0.1: 20, 1.0: 5}},
        "quick": {"pretrain": ["data.train_subset=10000", "trainer.max_epochs=6"], "finetune_epochs": {0.01: 30, 0.1: 10, 1.0: 3}},
    },
}
VARIANTS = {  # name: (run folder, overrides)
    "routed (default)": ("routed", []),
    "consistency off": ("consistency_off", ["consistency.weight=0"]),
    "end to end": ("end_to_end", ["schedule=end_to_end"]),
    "dense, equal active params": ("dense", ["model.stack=[ssl,dense,ssl]"]),
}
KEYS = (
    "linear_top1", "knn_top1", "routing_agreement", "routing_agreement_chance", "expert_usage_entropy", "dead_experts",
    "routing_position_nmi", "routing_shift_content", "routing_dropped_pairs", "train_time_s", "images_per_s",
)  # fmt: skip


def run(module: str, out: Path, overrides: list[str], threads: int) -> tuple[dict, float]:
    """Run ``python -m module`` into ``out`` (reusing a finished run) and return its metrics and wall time."""
    metrics = out / "metrics.json"
    if not metrics.exists():
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        command = [sys.executable, "-m", module, *overrides, "trainer.progress_bar=false", f"hydra.run.dir={out}"]
        print("$", " ".join(command[1:]), flush=True)
        start = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{' '.join(command[1:])} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        (out / "wall_s.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
    return json.loads(metrics.read_text()), float((out / "wall_s.txt").read_text())


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def stability_families(run_dir: Path, threads: int) -> dict[str, float]:
    """Agreement when the two views differ by one augmentation family only (the run's own strength)."""
    out = run_dir / "eval_stability"
    if not (out / "metrics.json").exists():
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        command = [sys.executable, "-m", "ssroute.evaluate", f"checkpoint={run_dir}", "protocols=[stability]", f"out={out}"]
        subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True)
    metrics = json.loads((out / "metrics.json").read_text())
    return {k.removeprefix("family/").removesuffix("/routing_agreement"): v for k, v in metrics.items() if k.startswith("family/") and k.endswith("/routing_agreement")}


def benchmark(dataset: str, seeds: int, quick: bool, runs: Path, threads: int) -> dict:
    budget = BUDGETS[dataset]["quick" if quick else "full"]
    base = [f"data={dataset}", *budget["pretrain"]]
    table: dict[str, dict] = {}
    for variant, (folder, overrides) in VARIANTS.items():
        per_seed = [run("pretrain", runs / dataset / folder / f"seed{s}", [*base, *overrides, f"seed={s}"], threads) for s in range(seeds)]
        table[variant] = {
            key: mean_std([m[key] for m, _ in per_seed]) for key in KEYS if all(key in m for m, _ in per_seed)
        } | {"wall_s": mean_std([w for _, w in per_seed]), "seeds": seeds}
    pretrained = runs / dataset / "routed" / "seed0"
    families = stability_families(pretrained, threads)
    finetunes: dict[str, dict] = {}
    data_overrides = [o for o in budget["pretrain"] if o.startswith("data.")]
    for fraction, epochs in budget["finetune_epochs"].items():
        name = f"{fraction:g}"
        common = [f"labels_fraction={fraction}", f"trainer.max_epochs={epochs}", *data_overrides]
        from_pretrained, _ = run("finetune", runs / dataset / "finetune" / f"pretrained_{name}", [f"checkpoint={pretrained}", *common], threads)
        scratch_model = [f"data={dataset}", "model=ssl_route_ssl"]
        from_scratch, _ = run("finetune", runs / dataset / "finetune" / f"scratch_{name}", [*scratch_model, *common], threads)
        finetunes[name] = {"pretrained": from_pretrained["test_top1"], "scratch": from_scratch["test_top1"], "labels": from_pretrained["num_labels"], "epochs": epochs}
    sys.path.insert(0, str(Path(__file__).parent))
    from raw_pixel_baselines import baselines

    subset = next((int(o.split("=")[1]) for o in budget["pretrain"] if o.startswith("data.train_subset=")), None)
    return {"budget": base, "variants": table, "stability_families": families, "finetune": finetunes, "raw_pixels": baselines(dataset, subset)}


def markdown(results: dict, meta: dict) -> str:
    lines = [f"# Self-supervised routing benchmark{' (quick budget)' if meta['quick'] else ''}", "", f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}; total wall time {meta['wall_s']:.0f} s.", ""]
    for dataset, r in results.items():
        lines += [f"## {dataset}", "", f"Budget: `python -m pretrain {' '.join(r['budget'])}` (plus the variant's overrides), seeds 0..{next(iter(r['variants'].values()))['seeds'] - 1}; mean ± std over seeds.", ""]
        lines += ["| run | linear | kNN | agreement (chance) | usage entropy | dead | position NMI | shift → content | train s |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for variant, v in r["variants"].items():
            cell = lambda key, digits=3, v=v: f"{v[key][0]:.{digits}f} ± {v[key][1]:.{digits}f}" if key in v else "–"  # noqa: E731
            agreement = f"{cell('routing_agreement')} ({v['routing_agreement_chance'][0]:.3f})" if "routing_agreement" in v else "–"
            lines.append(
                f"| {variant} | {cell('linear_top1')} | {cell('knn_top1')} | {agreement} | {cell('expert_usage_entropy')} | {cell('dead_experts', 0)} | "
                f"{cell('routing_position_nmi')} | {cell('routing_shift_content')} | {cell('train_time_s', 0)} |"
            )
        raw = r["raw_pixels"]
        lines += ["", f"Raw pixels, same split: linear {raw['linear_probe']:.3f}, weighted kNN {raw['knn20_weighted_cosine']:.3f}, kNN-5 {raw['knn5_euclidean']:.3f}.", ""]
        lines += ["Routing agreement of the default (seed 0) when the views differ by one augmentation family: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(r["stability_families"].items())) + ".", ""]
        lines += ["| labels | labelled images | epochs | fine-tuned from pretraining | from scratch | gain |", "| ---: | ---: | ---: | ---: | ---: | ---: |"]
        for fraction, f in r["finetune"].items():
            lines.append(f"| {float(fraction):.0%} | {f['labels']} | {f['epochs']} | {f['pretrained']:.3f} | {f['scratch']:.3f} | {f['pretrained'] - f['scratch']:+.3f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["digits", "fashion_mnist"], choices=sorted(BUDGETS))
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="small budgets: check the pipeline, not the numbers")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="intra-op threads per run (runs are sequential)")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "benchmarks" / "ssl_routing")
    args = parser.parse_args()
    start = time.perf_counter()
    runs = args.runs / ("quick" if args.quick else "full")
    results = {dataset: benchmark(dataset, args.seeds, args.quick, runs, args.threads) for dataset in args.datasets}
    command = "python benchmarks/ssl_routing.py " + " ".join(sys.argv[1:])
    meta = {"command": command.strip(), "machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} threads per run", "quick": args.quick, "wall_s": time.perf_counter() - start}
    stem = "ssl_routing_quick" if args.quick else "ssl_routing"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(results, meta))
    print(markdown(results, meta))


if __name__ == "__main__":
    main()
