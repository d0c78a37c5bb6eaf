"""The model card (``README.md``) of an exported folder, from the run's own files.

A Hub model card (YAML front matter, then markdown) saying what the model is
(architecture, routed blocks, router, experts, patch selection, inputs), how
well it does (the run's ``metrics.json``: kNN, linear probe, fine-tuned
accuracy), what its routing does (agreement of corresponding patches under
augmentation against chance, usage entropy, dead experts, content vs position,
per block), what it was trained on and with what budget, how to use it, and
the routing plots of ``<run>/eval/plots`` copied beside it. Every number is
read from the run; a key the run did not measure is left out.

>>> card = render_card({"model": {"name": "vit", "dim": 16, "depth": 2, "heads": 2, "patch_size": 2, "moe_layers": []},
...                     "inputs": {"image_size": 8, "channels": 1, "mean": [0.3], "std": [0.4]}, "source": {"run": "r", "data": "digits"}},
...                    {}, {"knn_top1": 0.91}, [], usage="model = ssroute.load(DIR)")
>>> "| weighted kNN top-1 (k=20, frozen features) | 0.910 |" in card, card.startswith("---")
(True, True)
"""

from __future__ import annotations

from typing import Any

HEADLINE = {
    "knn_top1": "weighted kNN top-1 (k=20, frozen features)",
    "linear_top1": "linear probe top-1 (frozen features)",
    "test_top1": "fine-tuned test top-1",
    "labels_fraction": "share of labels used to fine-tune",
}
ROUTING = {
    "routing_agreement": "routing agreement: corresponding patches of two augmented views on the same top-1 expert",
    "routing_agreement_chance": "agreement by chance with the same expert usage",
    "routing_js": "Jensen-Shannon divergence of corresponding patches' routing",
    "expert_usage_entropy": "expert usage entropy (1 = perfectly balanced)",
    "dead_experts": "experts no held-out patch reaches",
    "routing_position_nmi": "mutual information of expert and patch position (normalised)",
    "routing_shift_content": "share of routing that follows content when the image shifts",
    "routing_fluctuation": "share of probe patches whose expert changed between the last snapshots",
}
BUDGET = {
    "num_train": "training images",
    "epochs": "epochs",
    "steps": "optimiser steps",
    "train_time_s": "training time (s)",
    "images_per_s": "training throughput (images/s)",
    "params_total": "parameters",
    "params_active": "parameters active per token",
}


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def _table(rows: list[tuple[str, Any]], header: tuple[str, str] = ("", "")) -> list[str]:
    return [f"| {header[0]} | {header[1]} |", "| --- | ---: |", *[f"| {name} | {_value(value)} |" for name, value in rows]]


def _known(metrics: dict[str, Any], names: dict[str, str]) -> list[tuple[str, Any]]:
    return [(label, metrics[key]) for key, label in names.items() if key in metrics]


def describe_architecture(config: dict[str, Any]) -> str:
    """One line: depth, width, heads, patches, and the routed blocks with their router and experts."""
    model, inputs = config["model"], config["inputs"]
    patches = (config.get("patches") or {}).get("name", "grid")
    name = model.get("name", "vit")
    line = (
        f"ViT{'' if name == 'vit' else f' ({name})'}, {model['depth']} blocks of width {model['dim']} with {model['heads']} heads, "
        f"{model['patch_size']}x{model['patch_size']} patches ({patches}) of {inputs['channels']}-channel {inputs['image_size']}x{inputs['image_size']} images"
    )
    if model.get("moe_layers"):
        router = dict(config.get("router") or {})
        experts = dict(config.get("experts") or {})
        options = ", ".join(f"{k}={v}" for k, v in sorted(router.items()) if k != "name")
        line += (
            f"; blocks {list(model['moe_layers'])} are mixture-of-experts FFNs with {model['num_experts']} {experts.get('name', 'mlp')} experts "
            f"and a {router.get('name')} router" + (f" ({options})" if options else "")
        )
    return line + "."


def render_card(config: dict[str, Any], run_config: dict[str, Any], metrics: dict[str, Any], plots: list[str], usage: str) -> str:
    """The card's markdown: ``config`` is the export's ``config.json``, ``run_config`` the run's whole config,
    ``metrics`` its ``metrics.json`` ({} for an unfinished run), ``plots`` paths relative to the folder, ``usage`` a code block's text."""
    source, inputs = config["source"], config["inputs"]
    routed = bool(config["model"].get("moe_layers"))
    tags = ["image-feature-extraction", "vision-transformer", "self-supervised-learning", "ssroute"] + (
        ["mixture-of-experts"] if routed else []
    )
    lines = ["---", "library_name: ssroute", "pipeline_tag: image-feature-extraction", "tags:", *[f"- {t}" for t in tags], "---", ""]
    lines += [f"# ssroute backbone from run {source['run']}", "", describe_architecture(config), ""]
    ssl, schedule = (run_config.get("ssl") or {}).get("name"), (run_config.get("schedule") or {}).get("name")
    if ssl:
        lines += [f"Pretrained without labels with {ssl} ({schedule} schedule) on {source['data']}." + (
            f" Routers learned from the routing-consistency loss (weight {run_config['consistency']['weight']})." if routed and "consistency" in run_config else ""
        ), ""]  # fmt: skip
    lines += ["## Metrics", ""]
    headline = _known(metrics, HEADLINE)
    lines += [*_table(headline, ("metric", "value")), ""] if headline else ["The run wrote no metrics.json (it did not finish).", ""]
    if routed:
        lines += ["## Routing", "", "Measured on held-out images under the training augmentations, on the experts actually executed.", ""]
        lines += [*_table(_known(metrics, ROUTING), ("metric", "value")), ""]
        blocks = [b for b in config["model"]["moe_layers"] if f"block{b}/routing_agreement" in metrics]
        if blocks:
            lines += ["| block | agreement | chance | usage entropy | dead experts |", "| --- | ---: | ---: | ---: | ---: |"]
            for b in blocks:
                cells = [
                    _value(metrics.get(f"block{b}/{key}", "–"))
                    for key in ("routing_agreement", "routing_agreement_chance", "expert_usage_entropy", "dead_experts")
                ]
                lines.append(f"| {b} | " + " | ".join(cells) + " |")
            lines.append("")
    data, trainer = run_config.get("data") or {}, run_config.get("trainer") or {}
    lines += ["## Data and budget", ""]
    rows = [("data", source["data"]), *_known(metrics, BUDGET)]
    rows += [(label, data[key]) for key, label in (("batch_size", "batch size"), ("train_subset", "training subset")) if data.get(key)]
    rows += [
        (label, trainer[key])
        for key, label in (("precision", "precision"), ("accelerator", "accelerator"), ("devices", "devices"))
        if key in trainer
    ]
    rows += [("normalisation mean / std", f"{inputs['mean']} / {inputs['std']}")]
    lines += [*_table(rows, ("", "")), ""]
    lines += ["## Usage", "", "```python", usage.strip(), "```", ""]
    if plots:
        lines += ["## Routing plots", "", *[f"![{p.rsplit('/', 1)[-1].removesuffix('.png')}]({p})" for p in plots], ""]
    lines += ["Written by `python -m ssroute.export`; the numbers are the run's own `metrics.json`."]
    return "\n".join(lines) + "\n"
