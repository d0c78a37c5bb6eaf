"""``python -m ssroute.sweep_table MULTIRUN_DIR [--sort KEY] [--ascending] [--out PREFIX]``: a sweep as one table.

Reads every run folder of a Hydra multirun (``<dir>/<n>/.hydra/overrides.yaml``
and ``metrics.json``; a folder without ``metrics.json`` is listed as unfinished),
finds the *knobs* — the overrides whose value differs between runs, such as
``router``, ``model.moe_k`` or ``consistency.weight`` — and writes one row per run,
knob columns first, then the key metrics present in any run, sorted by a metric
(``linear_top1`` by default, best first). Writes ``sweep.csv`` (raw values) and
``sweep.md`` (rounded, with the overrides shared by every run above the table)
into the multirun folder, and prints the markdown.

>>> rows = [{"knobs": {"router": "vq"}, "metrics": {"linear_top1": 0.91234}, "status": "done", "run": "0"}]
>>> print(markdown_table(rows, ["router"], ["linear_top1"]))
| router | linear_top1 | status | run |
| --- | ---: | --- | --- |
| vq | 0.912 | done | 0 |
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from ssroute.errors import ConfigError

# Metric columns in display order; only those some run has are shown.
KEY_METRICS = (
    "linear_top1",
    "knn_top1",
    "test_top1",
    "routing_agreement",
    "routing_agreement_chance",
    "routing_fluctuation",
    "routing_position_majority",
    "expert_usage_entropy",
    "dead_experts",
    "train_time_s",
    "images_per_s",
)


def find_runs(sweep_dir: Path) -> list[Path]:
    """Run folders of a multirun (those holding ``.hydra/overrides.yaml``), in numeric order."""
    if not sweep_dir.is_dir():
        raise ConfigError(f"sweep folder {sweep_dir} does not exist; pass the folder a multirun wrote, e.g. multirun/pretrain/<time>.")
    runs = [p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml") if (p.parent.parent / ".hydra") == p.parent]
    if not runs:
        raise ConfigError(
            f"{sweep_dir} holds no run folders (<n>/.hydra/overrides.yaml); pass the multirun folder of python -m pretrain -m ..."
        )
    return sorted(runs, key=lambda p: [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(p.relative_to(sweep_dir)))])


def parse_overrides(run: Path) -> dict[str, str]:
    """``{key: value}`` of a run's command-line overrides (``+``/``++``/``~`` prefixes dropped)."""
    overrides = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text()) or []
    out = {}
    for item in overrides:
        key, _, value = str(item).partition("=")
        out[key.lstrip("+~")] = value
    return out


def read_run(sweep_dir: Path, run: Path) -> dict[str, Any]:
    """One row: the run's overrides, its metrics (empty when unfinished) and status."""
    metrics_file = run / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    return {
        "overrides": parse_overrides(run),
        "metrics": metrics,
        "status": "done" if metrics_file.exists() else "unfinished",
        "run": str(run.relative_to(sweep_dir)),
    }


def config_value(run: Path, key: str) -> str | None:
    """The value a run without ``key`` among its overrides ran with, from its resolved ``config.yaml``."""
    from omegaconf import OmegaConf

    if not (run / "config.yaml").exists():
        return None
    config = OmegaConf.load(run / "config.yaml")
    value = OmegaConf.select(config, key)
    if OmegaConf.is_dict(value):  # a config group such as router=vq: its name
        value = value.get("name")
    return None if value is None else str(OmegaConf.to_container(value) if OmegaConf.is_config(value) else value)


def find_knobs(rows: list[dict[str, Any]]) -> tuple[list[str], dict[str, str]]:
    """(keys whose value varies between runs in first-seen order, overrides every run shares)."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row["overrides"] if k not in keys]
    knobs = [k for k in keys if len({row["overrides"].get(k) for row in rows}) > 1]
    fixed = {k: rows[0]["overrides"][k] for k in keys if k not in knobs}
    return knobs, fixed


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        try:
            return float(value)
        except (TypeError, ValueError):
            return None
    return float(value)


def sort_rows(rows: list[dict[str, Any]], key: str, ascending: bool = False) -> list[dict[str, Any]]:
    """Rows by ``key`` (a metric or knob), best first; rows without it go last, in their order."""

    def value(row: dict[str, Any]) -> Any:
        return row["metrics"].get(key, row["knobs"].get(key))

    present = [r for r in rows if value(r) is not None and not (isinstance(value(r), float) and math.isnan(value(r)))]
    missing = [r for r in rows if r not in present]
    numeric = all(_number(value(r)) is not None for r in present)
    ordered = sorted(present, key=lambda r: _number(value(r)) if numeric else str(value(r)), reverse=not ascending)
    return ordered + missing


def format_value(value: Any) -> str:
    """Integers as they are; floats to 3 decimals below 10, 1 below 100, none above."""
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value).replace("|", "\\|")
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "nan"
    size = abs(value)
    return f"{value:.3f}" if size < 10 else f"{value:.1f}" if size < 100 else f"{value:.0f}"


def markdown_table(rows: list[dict[str, Any]], knobs: list[str], metrics: list[str]) -> str:
    """Knob columns, metric columns (right-aligned), status and run folder."""
    header = [*knobs, *metrics, "status", "run"]
    align = ["---"] * len(knobs) + ["---:"] * len(metrics) + ["---", "---"]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    for row in rows:
        cells = [format_value(row["knobs"].get(k)) for k in knobs] + [format_value(row["metrics"].get(m)) for m in metrics]
        lines.append("| " + " | ".join([*cells, row["status"], row["run"]]) + " |")
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict[str, Any]], knobs: list[str], metrics: list[str]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*knobs, *metrics, "status", "run"])
        for row in rows:
            writer.writerow(
                [*(row["knobs"].get(k, "") for k in knobs), *(row["metrics"].get(m, "") for m in metrics), row["status"], row["run"]]
            )


def sweep_table(sweep_dir: Path, sort: str = "linear_top1", ascending: bool = False, out: Path | None = None) -> str:
    """Collect ``sweep_dir`` into ``<out>.csv`` and ``<out>.md`` (default ``<sweep_dir>/sweep``); return the markdown."""
    rows = [read_run(sweep_dir, run) for run in find_runs(sweep_dir)]
    knobs, fixed = find_knobs(rows)
    for row in rows:
        row["knobs"] = {k: row["overrides"][k] if k in row["overrides"] else config_value(sweep_dir / row["run"], k) for k in knobs}
    present = {key for row in rows for key in row["metrics"]}
    metrics = [m for m in KEY_METRICS if m in present]
    if present and sort not in present and sort not in knobs:  # with no finished run there is nothing to sort yet
        available = ", ".join([*knobs, *sorted(present)])
        raise ConfigError(f"--sort {sort} is neither a knob nor a metric of this sweep; choose one of: {available}.")
    if sort in present and sort not in metrics:
        metrics.append(sort)  # sorting by it: show it
    rows = sort_rows(rows, sort, ascending)
    table = markdown_table(rows, knobs, metrics)
    out = out or sweep_dir / "sweep"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(Path(f"{out}.csv"), rows, knobs, metrics)
    done = sum(row["status"] == "done" for row in rows)
    shared = ", ".join(f"`{k}={v}`" for k, v in fixed.items()) or "none"
    summary = f"{len(rows)} runs ({done} finished) in `{sweep_dir}`, sorted by `{sort}` ({'ascending' if ascending else 'descending'}).\n"
    Path(f"{out}.md").write_text(f"{summary}Shared overrides: {shared}.\n\n{table}\n")
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ssroute.sweep_table", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a Hydra multirun folder, e.g. multirun/pretrain/<time>")
    parser.add_argument("--sort", default="linear_top1", help="metric or knob to sort by (default linear_top1)")
    parser.add_argument("--ascending", action="store_true", help="smallest first (default: largest first)")
    parser.add_argument("--out", type=Path, default=None, help="write PREFIX.csv and PREFIX.md (default <sweep_dir>/sweep)")
    args = parser.parse_args(argv)
    try:
        print(sweep_table(args.sweep_dir, args.sort, args.ascending, args.out))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
