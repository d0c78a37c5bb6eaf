"""Making models smaller: CoFI structured pruning, MoE + distillation, and upcycled models' inference time.

Every number comes from runs this script makes, in order, under ``--runs``
(a run folder with ``metrics.json`` is reused, so an interrupted benchmark continues):

1. sources: dense classifiers (4 blocks, dim 64) fine-tuned from scratch (``python -m finetune``) —
   digits with GELU and with ReLU, Fashion-MNIST (``data.train_subset``) with GELU;
2. ``python -m ssroute.prune`` at target sparsity 0.5 / 0.7 / 0.9 with
   ``distill=none|logits|layerwise`` on digits and Fashion-MNIST; GELU vs ReLU
   (digits, layerwise); prune-then-distil (prune with ``distill=none``, then
   distil the pruned model from the source with ``target_sparsity=0``) vs
   prune-with-distil;
3. MoEfication and MoE + distillation: each FFN of the digits GELU source
   upcycled into 8 experts (MLP selection); inference time and test accuracy
   at k = 8 / 4 / 2 / 1 against the dense source with no training, then the
   upcycled model (k = 4) trained on labels alone, distilled from the dense
   source (logits, layerwise), and pruned (MoE + CoFI, experts and expert units);
4. inference images/s of every model, one thread, batch 256, best of 3 passes over
   1024 test images, the models compared timed in alternation (the machine is shared).

    python benchmarks/compression.py [--quick] [--runs runs/compression]

Writes ``benchmarks/results/compression.{json,md}``; docs/compression.md holds the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ssroute.config import register_configs  # noqa: E402
from ssroute.data import build_data  # noqa: E402
from ssroute.moe import MoELayer  # noqa: E402
from ssroute.prune.measure import paired_images_per_second, top1  # noqa: E402
from ssroute.prune.run import load_run, run_prune  # noqa: E402
from ssroute.train.finetune import run_finetune  # noqa: E402
from ssroute.upcycle.run import _normalized, save_upcycled, upcycle_checkpoint  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
QUIET = ["trainer.progress_bar=false", "evaluate=false", "trainer.knn_every_n_epochs=0", "trainer.checkpoint_every_n_steps=1000"]


def compose_config(name: str, overrides: list[str]):
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def _done(folder: Path) -> dict | None:
    file = folder / "metrics.json"
    return json.loads(file.read_text()) if file.is_file() else None


def finetune(folder: Path, overrides: list[str]) -> dict:
    if (metrics := _done(folder)) is None:
        print(f"finetune {folder.name}: {' '.join(overrides)}", flush=True)
        run_finetune(compose_config("finetune", [*QUIET, *overrides]), folder, overrides)
        metrics = _done(folder)
    return metrics


def prune(folder: Path, overrides: list[str]) -> dict:
    if (metrics := _done(folder)) is None:
        print(f"prune {folder.name}: {' '.join(overrides)}", flush=True)
        run_prune(compose_config("prune", [*QUIET, *overrides]), folder, overrides)
        metrics = _done(folder)
    return metrics


KEYS = ("target_sparsity", "sparsity", "expected_sparsity", "params_before", "params_after", "test_top1_before", "test_top1",
        "images_per_s_before", "images_per_s", "speedup", "train_time_s", "nonuniformity/entropy", "kept/heads", "kept/units",
        "kept/hidden", "kept/mha", "kept/ffn", "kept/experts", "distill_loss/attn_removed", "distill_loss/attn_kept",
        "distill_loss/ffn_removed", "distill_loss/ffn_kept", "ripley_l/units", "ripley_l/hidden", "surgery_max_abs_diff")  # fmt: skip


def _keep(metrics: dict) -> dict:
    return {k: metrics[k] for k in KEYS if k in metrics}


def upcycle_speed(source: Path, folder: Path, ks: list[int], experts: int) -> dict:
    """Dense source vs its upcycled model at each k: test top-1 (no training) and images/s, one thread."""
    if (folder / "speed.json").is_file():
        return json.loads((folder / "speed.json").read_text())
    checkpoint = upcycle_checkpoint(str(source), num_experts=experts, selection="mlp", k=max(ks))
    run = save_upcycled(checkpoint, folder)
    config = checkpoint["hyper_parameters"]["config"]
    data = build_data(_data_cfg(config), 0)
    images, labels = _normalized(data.test.images, data), data.test.labels
    dense, dense_head, _, _ = load_run(str(source), data)
    models = {"dense": (dense, dense_head)}
    for k in ks:
        routed, routed_head, _, _ = load_run(str(run), data)
        for layer in routed.modules():
            if isinstance(layer, MoELayer):
                layer.set_k(k)
        models[f"k={k}"] = (routed, routed_head)
    speed = paired_images_per_second(models, images[:1024])  # timed in alternation: the same load for every model
    out = {
        name: {"top1": top1(model, head, images, labels), "images_per_s": round(speed[name], 1)} for name, (model, head) in models.items()
    }
    out["test_images"] = len(labels)
    (folder / "speed.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


def _data_cfg(config: dict):
    from omegaconf import OmegaConf

    from ssroute.config import DataConfig

    return OmegaConf.merge(OmegaConf.structured(DataConfig), config["data"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "compression")
    parser.add_argument("--quick", action="store_true", help="tiny budgets: checks the pipeline, measures nothing worth reading")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    parser.add_argument("--moe-sparsities", type=float, nargs="+", default=[0.7])
    parser.add_argument("--datasets", nargs="+", default=["digits", "fmnist"], help="datasets of the accuracy-vs-sparsity grid")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    runs = args.runs
    q = args.quick
    budget = {  # epochs: source fine-tuning, pruning
        "digits": (2, 2) if q else (40, 15),
        "fmnist": (1, 1) if q else (4, 2),
    }
    data = {"digits": ["data=digits"], "fmnist": ["data=fashion_mnist", "data.train_subset=10000"]}
    sparsities = args.sparsities
    start, load_before = time.perf_counter(), os.getloadavg()
    report: dict = {"upcycle": {}, "moe_distill": {}, "moe_cofi": {}, "command": "python benchmarks/compression.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                    "machine": f"{os.cpu_count()}-core CPU shared with other jobs, torch {torch.__version__}, 1 thread, batch 256",
                    "budget_epochs": budget, "sources": {}, "prune": {}}  # fmt: skip

    sources = {"digits_gelu": ("digits", []), "digits_relu": ("digits", ["model.activation=relu"]), "fmnist_gelu": ("fmnist", [])}
    sources = {name: value for name, value in sources.items() if value[0] in args.datasets or name == "digits_gelu"}
    name = "compression_quick" if q else "compression"
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every run, so an interrupted benchmark leaves what it measured
        report["seconds"] = round(time.perf_counter() - start, 1)
        report["load"] = [load_before[0], os.getloadavg()[0]]
        (args.out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / f"{name}.md").write_text(markdown(report))

    def source_run(source: str) -> None:
        dataset, extra = sources[source]
        metrics = finetune(
            runs / "sources" / source, [*data[dataset], "model=vit_tiny", f"trainer.max_epochs={budget[dataset][0]}", *extra]
        )
        report["sources"][source] = {k: metrics[k] for k in ("test_top1", "params_total", "train_time_s")}

    def prune_run(tag: str, source: str, extra: list[str]) -> dict:
        dataset = sources[source][0] if source in sources else "digits"
        epochs = budget[dataset][1]
        checkpoint = runs / "sources" / source if source in sources else runs / source
        overrides = [f"checkpoint={checkpoint}", f"trainer.max_epochs={epochs}", f"sparsity_warmup_epochs={max(1, epochs // 4)}",
                     "reg_learning_rate=0.05", *extra]  # fmt: skip
        metrics = _keep(prune(runs / "prune" / tag, overrides))
        metrics["overrides"] = overrides
        report["prune"][tag] = metrics
        save()
        return metrics

    # 1. accuracy vs sparsity on digits, no distillation / logits / layerwise
    source_run("digits_gelu")
    for s in sparsities:
        for distill in ("none", "logits", "layerwise"):
            prune_run(f"digits_gelu_s{s}_{distill}", "digits_gelu", [f"target_sparsity={s}", f"distill={distill}"])
    # 2. MoEfication: inference time and accuracy at k, then the upcycled model trained further, distilled, pruned
    report["upcycle"] = {"digits_gelu": upcycle_speed(runs / "sources" / "digits_gelu", runs / "upcycled" / "digits_gelu", [8, 4, 2, 1], 8)}
    save()
    upcycled = runs / "upcycled" / "digits_gelu_k4"
    if not (upcycled / "checkpoints" / "last.ckpt").is_file():
        save_upcycled(upcycle_checkpoint(str(runs / "sources" / "digits_gelu"), num_experts=8, selection="mlp", k=4), upcycled)
    teacher = f"teacher={runs / 'sources' / 'digits_gelu'}"
    moe = {"labels only (fine-tune)": ["distill=none"], "distilled: logits": ["distill=logits", teacher],
           "distilled: layerwise": ["distill=layerwise", teacher]}  # fmt: skip
    report["moe_distill"], report["moe_cofi"] = {}, {}
    for label, extra in moe.items():
        tag = "upcycled_k4_" + extra[0].split("=")[1]
        report["moe_distill"][label] = prune_run(tag, "upcycled/digits_gelu_k4", ["target_sparsity=0", *extra])
    for s in args.moe_sparsities:
        report["moe_cofi"][str(s)] = prune_run(
            f"upcycled_k4_s{s}_layerwise", "upcycled/digits_gelu_k4", [f"target_sparsity={s}", "distill=layerwise"]
        )
    # 3. GELU vs ReLU, prune-then-distil vs prune-with-distil, separate sublayer losses (digits, 0.7)
    if "digits_relu" in sources:
        source_run("digits_relu")
        prune_run("digits_relu_s0.7_layerwise", "digits_relu", ["target_sparsity=0.7", "distill=layerwise"])
        prune_run("digits_relu_s0.7_none", "digits_relu", ["target_sparsity=0.7", "distill=none"])
    if 0.7 in sparsities:
        prune_run("digits_gelu_s0.7_none_then_layerwise", "prune/digits_gelu_s0.7_none",
                  ["target_sparsity=0", "distill=layerwise", f"teacher={runs / 'sources' / 'digits_gelu'}"])  # fmt: skip
        prune_run(
            "digits_gelu_s0.7_layerwise_sublayer",
            "digits_gelu",
            ["target_sparsity=0.7", "distill=layerwise", "attn_weight=1", "ffn_weight=1"],
        )
    # 4. accuracy vs sparsity on Fashion-MNIST
    if "fmnist_gelu" in sources:
        source_run("fmnist_gelu")
        report["upcycle"]["fmnist_gelu"] = upcycle_speed(
            runs / "sources" / "fmnist_gelu", runs / "upcycled" / "fmnist_gelu", [8, 4, 2, 1], 8
        )
        for s in sparsities:
            for distill in ("none", "logits", "layerwise"):
                prune_run(f"fmnist_gelu_s{s}_{distill}", "fmnist_gelu", [f"target_sparsity={s}", f"distill={distill}"])

    save()
    print(markdown(report))


def _f(value, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(report: dict) -> str:
    p = report["prune"]
    lines = ["# Compression: structured pruning, MoE + distillation, upcycled inference", "",
             f"Command: `{report['command']}`", "",
             f"Machine: {report['machine']}; 1-min load average {report['load'][0]:.2f} -> {report['load'][1]:.2f}; "
             f"{report['seconds'] / 60:.0f} min in all. Epochs (source fine-tuning, pruning): {report['budget_epochs']}.", "",
             "## Sources (dense, fine-tuned from scratch)", "", "| source | test top-1 | parameters | train s |", "| --- | ---: | ---: | ---: |"]  # fmt: skip
    for name, s in report["sources"].items():
        lines.append(f"| {name} | {s['test_top1']:.4f} | {s['params_total']:.0f} | {s['train_time_s']:.0f} |")
    lines += ["", "## Accuracy, size and inference time vs sparsity", "",
              "| run | target | sparsity | params | test top-1 (before -> after) | images/s (before -> after) | speedup |",
              "| --- | ---: | ---: | ---: | --- | --- | ---: |"]  # fmt: skip
    for tag, m in p.items():
        lines.append(
            f"| {tag} | {_f(m.get('target_sparsity'), 1)} | {_f(m.get('sparsity'))} | {m.get('params_before', 0):.0f} -> {m.get('params_after', 0):.0f} | "
            f"{_f(m.get('test_top1_before'), 4)} -> {_f(m.get('test_top1'), 4)} | {_f(m.get('images_per_s_before'), 0)} -> {_f(m.get('images_per_s'), 0)} | "
            f"{_f(m.get('speedup'), 2)} |"
        )
    lines += ["", "## Where the masks pruned", "",
              "| run | kept heads | kept units | kept hidden | kept attention layers | kept FFNs | kept experts | entropy of removed over blocks | Ripley L units | loss attn removed / kept | loss FFN removed / kept |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]  # fmt: skip
    for tag, m in p.items():
        if m.get("target_sparsity", 0) == 0:
            continue
        lines.append(
            f"| {tag} | {_f(m.get('kept/heads'))} | {_f(m.get('kept/units'))} | {_f(m.get('kept/hidden'))} | {_f(m.get('kept/mha'))} | {_f(m.get('kept/ffn'))} | "
            f"{_f(m.get('kept/experts'))} | {_f(m.get('nonuniformity/entropy'))} | {_f(m.get('ripley_l/units'))} | "
            f"{_f(m.get('distill_loss/attn_removed'), 4)} / {_f(m.get('distill_loss/attn_kept'), 4)} | "
            f"{_f(m.get('distill_loss/ffn_removed'), 4)} / {_f(m.get('distill_loss/ffn_kept'), 4)} |"
        )
    lines += ["", "## Upcycled (MoEfied) models: inference at k experts per token, no training after upcycling", "",
              "| source | model | test top-1 | images/s |", "| --- | --- | ---: | ---: |"]  # fmt: skip
    for source, u in report["upcycle"].items():
        for model in ("dense", "k=8", "k=4", "k=2", "k=1"):
            lines.append(f"| {source} | {model} | {u[model]['top1']:.4f} | {u[model]['images_per_s']:.0f} |")
    lines += ["", "## MoE + distillation: the upcycled digits model (8 experts, k = 4) trained further", "",
              "| training | test top-1 (upcycled -> trained) | images/s |", "| --- | --- | ---: |"]  # fmt: skip
    for label, m in report["moe_distill"].items():
        lines.append(f"| {label} | {_f(m.get('test_top1_before'), 4)} -> {_f(m.get('test_top1'), 4)} | {_f(m.get('images_per_s'), 0)} |")
    lines += ["", "## MoE + CoFI: pruning the upcycled model's experts, expert units, heads and hidden dimension", "",
              "| target | sparsity | params | test top-1 (before -> after) | images/s (before -> after) | kept experts | kept units |",
              "| ---: | ---: | --- | --- | --- | ---: | ---: |"]  # fmt: skip
    for s, m in report["moe_cofi"].items():
        lines.append(
            f"| {s} | {_f(m.get('sparsity'))} | {m['params_before']:.0f} -> {m['params_after']:.0f} | {_f(m.get('test_top1_before'), 4)} -> "
            f"{_f(m.get('test_top1'), 4)} | {_f(m.get('images_per_s_before'), 0)} -> {_f(m.get('images_per_s'), 0)} | {_f(m.get('kept/experts'))} | "
            f"{_f(m.get('kept/units'))} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
