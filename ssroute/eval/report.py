"""``report.md`` of an evaluation: header, protocol tables, routing sections and every plot.

A pure function of the flat metrics (``eval/metrics.json``), the plot files and
the run's config: tables are built from whatever keys are present, so a dense
model (no routing keys) or unlabelled data (no probe keys) gives a shorter
report, never a broken one. Plot links are relative to the report's folder.

>>> text = render_report({"knn_top1": 0.9, "block0/knn_top1": 0.5}, ["plots/usage.png"], {"model": {"depth": 1}}, run="runs/x")
>>> print(text.splitlines()[0])
# Evaluation of runs/x
>>> "| 0 | dense | 0.500 | – |" in text, "![usage](plots/usage.png)" in text
(True, True)
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

BLOCK_KEY = re.compile(r"^block(\d+)/(.+)$")
PROBE_NAMES = ("knn_top1", "linear_top1")


def render_report(
    metrics: Mapping[str, Any],
    plots: Iterable[str | Path],
    config: Mapping[str, Any],
    *,
    run: str = "",
    skipped: Mapping[str, str] | None = None,
) -> str:
    """Markdown text tying ``metrics`` and ``plots`` (paths relative to the report) together."""
    lines = [f"# Evaluation of {run or 'a run'}", "", *_header(config, metrics), ""]
    if skipped:
        lines += ["Skipped: " + "; ".join(f"{name} ({why})" for name, why in skipped.items()) + ".", ""]
    lines += _labelled(metrics)
    lines += _block_probes(metrics, config)
    lines += _routing(metrics)
    lines += _other(metrics)
    plots = [Path(p) for p in plots]
    if plots:
        lines += ["## Plots", ""]
        for plot in plots:
            lines += [f"![{plot.stem}]({plot.as_posix()})", ""]
    return "\n".join(lines).rstrip() + "\n"


def _get(config: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def _header(config: Mapping[str, Any], metrics: Mapping[str, Any]) -> list[str]:
    model = _get(config, "model", {}) or {}
    stack = model.get("stack") or [f"{model.get('depth', '?')} blocks, MoE at {list(model.get('moe_layers') or []) or 'none'}"]
    routed = bool(model.get("moe_layers"))
    router = _get(config, "router.name", "–") if routed else "– (dense)"
    experts = f"{model.get('num_experts')} × {_get(config, 'experts.name', 'mlp')}" if routed else "–"
    if "ssl" in config:
        training = f"ssl {_get(config, 'ssl.name')}, schedule {_get(config, 'schedule.name', 'end_to_end')}"
    else:
        training = f"fine-tuned ({_get(config, 'mode')}, labels_fraction {_get(config, 'labels_fraction')}) from {_get(config, 'checkpoint') or 'scratch'}"
    budget = f"{_get(config, 'trainer.max_epochs')} epochs, batch {_get(config, 'data.batch_size')}, lr {_get(config, 'optim.lr')}"
    rows = [
        (
            "data",
            f"{metrics.get('data', _get(config, 'data.name'))} ({metrics.get('num_train', '?')} train / {metrics.get('num_test', '?')} test images)",
        ),
        ("stack", f"{' → '.join(map(str, stack))}, dim {model.get('dim')}, patch {model.get('patch_size')}"),
        ("router", str(router)),
        ("experts", experts),
        ("training", training),
        ("budget", budget),
    ]
    return ["| | |", "| --- | --- |", *(f"| {name} | {value} |" for name, value in rows)]


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else ("–" if value is None else str(value))


def _labelled(metrics: Mapping[str, Any]) -> list[str]:
    rows = [("kNN (k=20, T=0.07)", metrics.get("knn_top1")), ("linear probe", metrics.get("linear_top1"))]
    shots = sorted(int(m.group(1)) for key in metrics if (m := re.fullmatch(r"fewshot/(\d+)shot_top1", key)))
    for n in shots:
        mean, std = metrics[f"fewshot/{n}shot_top1"], metrics.get(f"fewshot/{n}shot_top1_std")
        rows.append((f"{n}-shot nearest class mean", f"{mean:.3f} ± {std:.3f}" if std is not None else mean))
    rows += [("retrieval precision@1", metrics.get("retrieval/precision_at_1")), ("retrieval MAP@R", metrics.get("retrieval/map_at_r"))]
    rows = [(name, value) for name, value in rows if value is not None]
    if not rows:
        return []
    return [
        "## Labelled protocols (frozen features, test split)",
        "",
        "| protocol | top-1 |",
        "| --- | --- |",
        *(f"| {n} | {_fmt(v)} |" for n, v in rows),
        "",
    ]


def _per_block(metrics: Mapping[str, Any]) -> dict[int, dict[str, Any]]:
    blocks: dict[int, dict[str, Any]] = {}
    for key, value in metrics.items():
        if m := BLOCK_KEY.match(key):
            blocks.setdefault(int(m.group(1)), {})[m.group(2)] = value
    return dict(sorted(blocks.items()))


def _block_probes(metrics: Mapping[str, Any], config: Mapping[str, Any]) -> list[str]:
    blocks = {i: v for i, v in _per_block(metrics).items() if any(p in v for p in PROBE_NAMES)}
    if not blocks:
        return []
    routed = set(_get(config, "model.moe_layers", []) or [])
    lines = ["## Per-block probes", "", "| block | FFN | kNN top-1 | linear top-1 |", "| --- | --- | --- | --- |"]
    for i, values in blocks.items():
        lines.append(f"| {i} | {'MoE' if i in routed else 'dense'} | {_fmt(values.get('knn_top1'))} | {_fmt(values.get('linear_top1'))} |")
    return [*lines, ""]


def _routing(metrics: Mapping[str, Any]) -> list[str]:
    per_block: dict[Any, dict[str, Any]] = {
        i: {k: v for k, v in values.items() if k not in PROBE_NAMES} for i, values in _per_block(metrics).items()
    }
    per_block = {i: v for i, v in per_block.items() if v}
    if not per_block:
        return []
    names = {k for v in per_block.values() for k in v}
    means = {k: metrics[k] for k in names if k in metrics}  # the same statistic over all routing blocks
    if means:
        per_block["all"] = means
    lines = ["## Routing", ""]
    plain = sorted(k for k in names if "/" not in k)
    if plain:
        lines += [_table_row(["block", *plain]), _table_row(["---"] * (len(plain) + 1))]
        lines += [_table_row([str(i), *(_fmt(v.get(k)) for k in plain)]) for i, v in per_block.items()]
        lines.append("")
    for scope, title in (("family", "Agreement by augmentation family"), ("strength", "Agreement over augmentation strength")):
        columns = sorted({k.split("/")[1] for k in names if k.startswith(f"{scope}/") and k.endswith("/routing_agreement")}, key=_natural)
        if not columns:
            continue
        lines += [f"### {title}", "", _table_row(["block", *columns]), _table_row(["---"] * (len(columns) + 1))]
        lines += [_table_row([str(i), *(_fmt(v.get(f"{scope}/{c}/routing_agreement")) for c in columns)]) for i, v in per_block.items()]
        in_run = [metrics.get(f"{scope}/{c}/in_run") for c in columns]
        if any(flag is not None for flag in in_run):  # families the run leaves off are measured at a reference magnitude
            lines.append(_table_row(["in the run's augmentation", *("–" if f is None else ("yes" if f else "no") for f in in_run)]))
        lines.append("")
    return lines


def _natural(text: str) -> tuple[float, str]:
    try:
        return float(text), text
    except ValueError:
        return float("inf"), text


def _table_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _other(metrics: Mapping[str, Any]) -> list[str]:
    shown = re.compile(r"^(block\d+/|fewshot/|retrieval/|knn_top1$|linear_top1$|data$|num_train$|num_test$)")
    block_names = {m.group(2) for key in metrics if (m := BLOCK_KEY.match(key))}  # their means over blocks are in the routing tables
    rest = {k: v for k, v in sorted(metrics.items()) if not shown.match(k) and k not in block_names and not k.endswith("/in_run")}
    if not rest:
        return []
    return ["## Other metrics", "", "| key | value |", "| --- | --- |", *(f"| {k} | {_fmt(v)} |" for k, v in rest.items()), ""]
