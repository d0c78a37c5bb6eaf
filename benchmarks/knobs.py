"""Knob-impact table: one knob at a time from the default recipe, at a fixed budget, >= 2 seeds per setting.

The research notes: "Quantify the impact of different 'knobs' ... parameter
sweep, build table of impact, see what matters". Every knob is one Hydra
multirun (``python -m pretrain -m ... seed=0,1``) over a few values of that
knob, everything else at the default recipe — read from ``configs/`` when the
script starts, so the sweep follows the default wherever it moves: a value
equal to the default is not rerun, and knobs that do not apply to the default
(``router.k`` for a router without k, ``model.stack`` positions without a
stack) say so and are skipped. ``python -m ssroute.sweep_table`` turns each
multirun into its per-run table (``<sweep>/sweep.{csv,md}``); this script then
pairs every setting's seeds with the default's and writes the effect table:
per setting and metric (linear probe, kNN, routing agreement, the share of
routing decisions predicted by patch position alone, images/s) the
mean over seeds of ``setting - default`` with its seed spread (min and max of
the per-seed differences), sorted by the size of the linear-probe effect.

    python benchmarks/knobs.py                       # every knob, Fashion-MNIST 10k images, 3 epochs, seeds 0 1
    python benchmarks/knobs.py --knobs router consistency --epochs 6
    python benchmarks/knobs.py --quick               # digits, 256 images, 1 epoch, 2 knobs: checks the pipeline end to end
    python benchmarks/knobs.py --list                # the knobs, their questions and the sweeps they would run
    python benchmarks/knobs.py --jobs 2              # two multiruns at once, each on its own share of the cores

With ``--jobs N`` the multiruns (the default's included) run N at a time, each
pinned to its own ``cores / N`` CPUs with as many threads, so the runs do not
oversubscribe the cores and images/s stays comparable between settings: every
run trains while N - 1 others do.

Multiruns go to ``--runs`` (default ``multirun/knobs``; ``--quick``:
``multirun/knobs_quick``); a knob whose folder already has a finished run for
every setting is not rerun (delete the folder to remeasure). Writes
``benchmarks/results/knobs.{json,md}`` (``--quick``: ``knobs_quick.{json,md}``).
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import queue
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
METRICS = [
    ("linear_top1", "linear"),
    ("knn_top1", "kNN"),
    ("routing_agreement", "agreement"),
    ("routing_position_majority", "by position"),  # share of routing decisions the patch position alone predicts
    ("images_per_s", "images/s"),
]


@dataclass
class Knob:
    """One knob: the note's question it answers and the multirun overrides that sweep it (values other than the default)."""

    name: str
    question: str
    sweep: list[str] = field(default_factory=list)  # e.g. ["router=expert_choice,vq"]; a cartesian product like Hydra's
    skipped: str = ""  # why the knob does not apply to the default recipe


def default_recipe() -> dict:
    """The default pretraining config (``configs/pretrain.yaml`` and its groups) as a plain dict."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from ssroute.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return OmegaConf.to_container(compose(config_name="pretrain"), resolve=False)


def _values(key: str, values: list, default) -> str | None:
    """``key=v1,v2`` over the values that differ from the default, or None when none does."""
    rest = [v for v in values if not _same(v, default)]
    return f"{key}={','.join(_literal(v) for v in rest)}" if rest else None


def _same(a, b) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a).replace(" ", "") == str(b).replace(" ", "")


def _literal(value) -> str:
    if isinstance(value, list):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value)


def knobs(recipe: dict, num_patches: int) -> list[Knob]:
    """The knobs around ``recipe`` (the default config), in the order of the notes' questions."""
    from ssroute.experts import EXPERTS
    from ssroute.registry import option_names
    from ssroute.routing import ROUTERS

    router, experts, model = recipe["router"], recipe["experts"], recipe["model"]
    out: list[Knob] = []

    def add(name: str, question: str, *sweeps: str | None, skipped: str = "") -> None:
        chosen = [s for s in sweeps if s]
        out.append(Knob(name, question, chosen, skipped or ("" if chosen else "every value is the default")))

    families = [
        "token_choice",
        "expert_choice",
        "sinkhorn_token_choice",
        "sinkhorn_expert_choice",
        "soft_moe",
        "vq",
        "hungarian",
        "hash",
        "random",
    ]
    add(
        "router", "Can we reformulate the routing problem (hash / look-up, set matching, ...)?", _values("router", families, router["name"])
    )
    has_k = "k" in option_names(ROUTERS.get(router["name"]), ("dim", "num_experts"))
    add("k", "Why route to a fixed number of experts? (fixed k)", _values("router.k", [1, 2, 4], router.get("k")) if has_k else None,
        skipped="" if has_k else f"the default router {router['name']} has no k")  # fmt: skip
    add("dynamic_k", "Allow a token to choose how many experts (dynamic k)?", _values("router", ["top_p", "threshold"], router["name"]))
    add("num_experts", "How many experts?", _values("model.num_experts", [4, 8, 16], model.get("num_experts")))
    types = [n for n in EXPERTS.names() if n != "mixed"] + ["mixed"]
    add("expert_type", "Why are experts all MLPs (attention, conv, LUT, hypernetwork, mixed)?", _values("experts", types, experts["name"]))
    is_mlp = experts["name"] == "mlp"
    add("expert_depth", "Why are experts all 2-layer MLPs — why not deeper?", _values("experts.depth", [2, 3, 4], experts.get("depth")) if is_mlp else None,
        skipped="" if is_mlp else f"the default experts {experts['name']} have no depth")  # fmt: skip
    weight = recipe["consistency"]["weight"]
    add(
        "consistency",
        "Can self-supervision (augmentation consistency) assist routing?",
        _values("consistency.weight", [0, 0.5, 1, 2], weight),
    )
    stack = list(model.get("stack") or [])
    if stack and stack.count("route") == 1:
        dense = [s for s in stack if s != "route"]
        places = [["route", *dense], dense[: len(dense) // 2] + ["route"] + dense[len(dense) // 2 :], [*dense, "route"]]
        add(
            "routing_position",
            "How important is early routing? Can self-supervision assist better early routing? (route first / middle / last, consistency on and off)",
            f"model.stack={','.join(_literal(p) for p in places)} consistency.weight={weight},0",
        )  # fmt: skip  (the default's own cell checks repeatability)
        blocks = sum(model.get("ssl_layers", 1) if s == "ssl" else 1 for s in stack)
        add("routing_everywhere", "Routing is all you need? Every block routed vs one routed block, equal active parameters (k=1); "
            "a layerwise schedule gives each one-block stage max(1, epochs // stages) epochs.",
            f"model.stack={_literal(['route'] * blocks)}")  # fmt: skip
    else:
        depth, layers = model["depth"], list(model.get("moe_layers") or [])
        places = [[0], [depth // 2], [depth - 1]]
        add("routing_position", "How important is early routing? (routed block first / middle / last, consistency on and off)",
            f"model.moe_layers={','.join(_literal(p) for p in places)} consistency.weight={weight},0")  # fmt: skip
        add("routing_everywhere", "Routing is all you need? Every block routed vs one routed block (k=1).",
            _values("model.moe_layers", [list(range(depth))], layers))  # fmt: skip
    selectors = ["entropy_topk", "entropy_maxsum", "random", "sequential"]
    add("patches", "Non-grid patch sampling; can entropy stand in for patch importance?",
        f"{_values('patches', selectors, recipe['patches']['name'])} patches.num_patches={num_patches}")  # fmt: skip
    add(
        "schedule",
        "Layerwise SSL -> routing -> SSL vs joint training?",
        _values("schedule", ["end_to_end", "layerwise", "layerwise_then_joint"], recipe["schedule"]["name"]),
    )
    add(
        "random_fraction",
        "Random routing hurts (sometimes), too much destroys: why?",
        _values("router.random_fraction", [0.1, 0.5, 1.0], router.get("random_fraction", 0.0)),
    )
    return out


def budget(args: argparse.Namespace) -> list[str]:
    """The fixed budget every run shares (measuring during training off: it never changes a run)."""
    overrides = [f"data={args.data}", f"trainer.max_epochs={args.epochs}", "evaluate=false", "trainer.progress_bar=false",
                 "trainer.knn_every_n_epochs=0", "trainer.fluctuation_every_n_steps=0", f"seed={','.join(map(str, args.seeds))}"]  # fmt: skip
    if args.subset:
        overrides.append(f"data.train_subset={args.subset}")
    return overrides + list(args.override)


def sweep_size(overrides: list[str]) -> int:
    """Runs a Hydra multirun of ``overrides`` makes (the product of the sweeps' lengths), from Hydra's own parser."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    total = 1
    for override in OverridesParser.create().parse_overrides(overrides):
        if override.is_sweep_override():
            total *= len(list(override.sweep_string_iterator()))
    return total


def lanes(jobs: int) -> queue.Queue[list[int]]:
    """``jobs`` disjoint sets of this process's CPUs, one per concurrent multirun."""
    try:
        cores = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux: no pinning, threads only
        cores = list(range(os.cpu_count() or 1))
    if jobs > len(cores):
        raise SystemExit(f"--jobs {jobs} is more than the {len(cores)} CPUs this process may use; pass --jobs {len(cores)} or fewer.")
    free: queue.Queue[list[int]] = queue.Queue()
    for lane in range(jobs):
        free.put(cores[lane::jobs])
    return free


def finished(folder: Path, sweep: list[str], args: argparse.Namespace) -> bool:
    """Whether ``folder`` holds a finished run for every setting of ``sweep`` (an earlier call's, reused)."""
    done = len(list(folder.glob("*/metrics.json"))) if folder.is_dir() else 0
    return done >= sweep_size([*budget(args), *_split(sweep)])


def multirun(folder: Path, sweep: list[str], args: argparse.Namespace, free: queue.Queue[list[int]] | None = None) -> Path:
    """Run (or reuse) the multirun of ``sweep`` in ``folder`` and tabulate it with ``python -m ssroute.sweep_table``.

    With ``free`` (from :func:`lanes`) the multirun takes one set of CPUs for its
    runs, pinned there with one thread per CPU, and gives it back when it ends.
    """
    if not finished(folder, sweep, args):
        command = [sys.executable, "-m", "pretrain", "-m", *budget(args), *_split(sweep), f"hydra.sweep.dir={folder}"]
        cores = free.get() if free is not None else None
        try:
            env, pin = dict(os.environ), None
            if cores is not None:
                env["OMP_NUM_THREADS"] = str(len(cores))
                if hasattr(os, "sched_setaffinity"):
                    pin = lambda: os.sched_setaffinity(0, cores)  # noqa: E731
            print(" ".join(command[1:]) + (f"    # CPUs {cores}" if cores is not None else ""), flush=True)
            subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, env=env, preexec_fn=pin)
        finally:
            if cores is not None:
                free.put(cores)
    subprocess.run([sys.executable, "-m", "ssroute.sweep_table", str(folder)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return folder / "sweep.csv"


def _split(sweep: list[str]) -> list[str]:
    return [part for s in sweep for part in s.split(" ")]


def read_table(path: Path) -> dict[tuple[str, ...], dict[str, dict[str, float]]]:
    """``{setting: {seed: {metric: value}}}`` from a ``sweep.csv``; the setting is the knob columns other than ``seed``."""
    from ssroute.sweep_table import KEY_METRICS

    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return {}
    knob_columns = [c for c in rows[0] if c not in ("seed", "status", "run", *KEY_METRICS)]
    table: dict[tuple[str, ...], dict[str, dict[str, float]]] = {}
    for row in rows:
        if row["status"] != "done":
            continue
        setting = tuple(f"{c}={row[c]}" for c in knob_columns)
        values = {m: float(row[m]) for m in (*(m for m, _ in METRICS), "train_time_s") if row.get(m) not in (None, "")}
        table.setdefault(setting, {})[row.get("seed", "0")] = values
    return table


def effects(default: dict[str, dict[str, float]], setting: dict[str, dict[str, float]]) -> dict[str, dict[str, float] | None]:
    """Per metric the mean over paired seeds of ``setting - default``, and the min and max of those differences."""
    out: dict[str, dict[str, float] | None] = {}
    for metric, _ in METRICS:
        diffs = [setting[s][metric] - default[s][metric] for s in setting if s in default and metric in setting[s] and metric in default[s]]
        out[metric] = {"mean": statistics.fmean(diffs), "min": min(diffs), "max": max(diffs), "seeds": len(diffs)} if diffs else None
    return out


def markdown(rows: list[dict], baseline: dict[str, dict[str, float]], meta: dict, skipped: dict[str, str]) -> str:
    timing = f"wall time of this call {meta['wall_time_s']:.0f} s, training time of all runs summed {meta['train_time_s_total']:.0f} s"
    if meta["multiruns_reused"]:
        timing += f" ({meta['multiruns_reused']} of {meta['multiruns']} multiruns finished by an earlier call and reused)"
    lines = ["# Knob impact", "", f"`{meta['command']}` — {meta['budget']}; {meta['machine']}; {timing}.", ""]
    base = {m: statistics.fmean(v[m] for v in baseline.values() if m in v) for m, _ in METRICS if any(m in v for v in baseline.values())}
    shown = {m: (f"{base[m]:.1f}" if m == "images_per_s" else f"{base[m]:.3f}") for m in base}
    lines += ["Default recipe (mean over seeds): " + ", ".join(f"{t} {shown.get(m, '–')}" for m, t in METRICS), ""]
    lines += ["Each cell: setting − default, mean over paired seeds [min, max]; sorted by the size of the linear-probe effect.", ""]
    lines += ["| knob | setting | " + " | ".join(t for _, t in METRICS) + " |", "| --- | --- |" + " ---: |" * len(METRICS)]
    for row in rows:
        cells = []
        for metric, _ in METRICS:
            e = row["effects"][metric]
            digits = 1 if metric == "images_per_s" else 3
            cells.append("–" if e is None else f"{e['mean']:+.{digits}f} [{e['min']:+.{digits}f}, {e['max']:+.{digits}f}]")
        lines.append(f"| {row['knob']} | {row['setting']} | " + " | ".join(cells) + " |")
    if skipped:
        lines += ["", "Not measured: " + "; ".join(f"`{k}` ({why})" for k, why in skipped.items()) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--knobs", nargs="*", default=None, help="knob names (default: all; see --list)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--data", default="fashion_mnist")
    parser.add_argument("--subset", type=int, default=10000, help="data.train_subset (0 = every training image)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--num-patches", type=int, default=25, help="patches.num_patches of the patch-selector knob")
    parser.add_argument("--override", nargs="*", default=[], help="extra overrides every run shares (part of the fixed budget)")
    parser.add_argument("--runs", type=Path, default=ROOT / "multirun" / "knobs")
    parser.add_argument("--quick", action="store_true", help="digits, 256 images, 1 epoch, knobs consistency and num_experts")
    parser.add_argument("--list", action="store_true", help="print the knobs and their sweeps, run nothing")
    parser.add_argument("--jobs", type=int, default=1, help="multiruns at once, each pinned to its own cores / jobs CPUs")
    args = parser.parse_args()
    name = "knobs"
    if args.quick:
        args.data, args.subset, args.epochs, args.num_patches = "digits", 256, 1, 9
        args.knobs = args.knobs or ["consistency", "num_experts"]
        args.override = [*args.override, "data.batch_size=128"]
        args.runs, name = args.runs.with_name(args.runs.name + "_quick"), "knobs_quick"
    if len(args.seeds) < 2:
        parser.error("--seeds needs at least 2 seeds: the table reports each effect with its seed spread")
    recipe = default_recipe()
    all_knobs = knobs(recipe, args.num_patches)
    unknown = sorted(set(args.knobs or []) - {k.name for k in all_knobs})
    if unknown:
        parser.error(f"unknown knob(s) {unknown}; choose from {[k.name for k in all_knobs]}")
    chosen = [k for k in all_knobs if args.knobs is None or k.name in args.knobs]
    if args.list:
        for knob in chosen:
            print(f"{knob.name}: {knob.question}\n    {' '.join(knob.sweep) or 'skipped: ' + knob.skipped}")
        return
    start = time.time()
    measured = [k for k in chosen if k.sweep]
    skipped = {k.name: k.skipped for k in chosen if not k.sweep}
    free = lanes(args.jobs) if args.jobs > 1 else None
    reused = sum(finished(args.runs / name, sweep, args) for name, sweep in [("default", []), *((k.name, k.sweep) for k in measured)])
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        default_run = pool.submit(multirun, args.runs / "default", [], args, free)
        sweeps = {k.name: pool.submit(multirun, args.runs / k.name, k.sweep, args, free) for k in measured}
        baseline = read_table(default_run.result()).get((), {})
        tables = {name: read_table(future.result()) for name, future in sweeps.items()}
    rows = []
    for knob in measured:
        for setting, seeds in tables[knob.name].items():
            rows.append(
                {
                    "knob": knob.name,
                    "setting": " ".join(setting) or " ".join(knob.sweep),
                    "effects": effects(baseline, seeds),
                    "seeds": seeds,
                }
            )
    rows.sort(key=lambda r: -abs(r["effects"]["linear_top1"]["mean"]) if r["effects"]["linear_top1"] else 0.0)
    fixed = " ".join(o for o in budget(args) if not o.startswith("seed="))
    every_setting = [baseline, *(seeds for table in tables.values() for seeds in table.values())]
    meta = {
        "command": "python benchmarks/knobs.py" + (" --quick" if args.quick else "") + (f" --jobs {args.jobs}" if args.jobs > 1 else ""),
        "budget": f"python -m pretrain {fixed}, seeds {args.seeds}, everything else the default recipe",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {args.jobs} run(s) at once"
        + (
            f" on {len(os.sched_getaffinity(0)) // args.jobs} CPU(s) and thread(s) each"
            if args.jobs > 1 and hasattr(os, "sched_getaffinity")
            else ""
        )
        + ", no GPU",
        "wall_time_s": round(time.time() - start, 1),
        "train_time_s_total": round(sum(run.get("train_time_s", 0.0) for seeds in every_setting for run in seeds.values()), 1),
        "multiruns": 1 + len(measured),
        "multiruns_reused": reused,
        "default": {
            "router": recipe["router"],
            "experts": recipe["experts"],
            "model": recipe["model"],
            "consistency": recipe["consistency"],
            "schedule": recipe["schedule"],
            "patches": recipe["patches"],
        },  # fmt: skip
        "questions": {k.name: k.question for k in chosen},
        "sweeps": {k.name: k.sweep for k in chosen},
    }
    from ssroute.io import atomic_open, write_json_atomic

    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json_atomic(RESULTS / f"{name}.json", {"meta": meta, "baseline": baseline, "rows": rows, "skipped": skipped})
    text = markdown(rows, baseline, meta, skipped)
    with atomic_open(RESULTS / f"{name}.md") as handle:
        handle.write(text)
    print(text)


if __name__ == "__main__":
    main()
