"""The GPU path in one prepared script: bf16 pretraining of the routed and the dense stack, faiss on the GPU, MoE-layer ratios.

Run on a machine with a CUDA GPU, from the repository root, after copying the
Fashion-MNIST files into a git-ignored folder of the checkout (the script
fits in about 8 minutes on one recent GPU):

    mkdir -p runs/fashion-mnist && cp /usr/share/datasets/fashion-mnist/* runs/fashion-mnist/
    python benchmarks/gpu.py --fashion-root runs/fashion-mnist

It records, into ``benchmarks/results/gpu.json`` and ``gpu.md``:

1. the device, its compute capability, how many GPUs faiss sees, and the expert
   backend the MoE layer picks for bfloat16 on it (``grouped_mm`` expected on SM >= 8.0);
2. the MoE layer against the dense FFN (fwd+bwd, bfloat16 autocast, interleaved
   medians) for token choice, expert choice and VQ at 256 and 32 images, eager and
   ``torch.compile``'d (``benchmarks/moe_layer.py --no-cpu --bf16 --compile``);
3. pretraining on Fashion-MNIST with ``trainer.precision=bf16-mixed`` and ``trainer.compile=true`` of the
   default routed stack and of the dense stack ``[ssl,dense,ssl]``, same schedule
   and budget: images/s (training steps), peak GPU memory, wall time, and the
   online monitor's kNN (faiss on the GPU when faiss-gpu is installed).

Each part is timed and a failing part is recorded with its error, so one run
reports everything that works.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"


def device_facts() -> dict:
    import faiss
    import torch

    from ssroute.experts.grouped import backend_for

    x = torch.zeros(4, 8, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        backend = backend_for(x, [1, 3])
    return {
        "gpu": torch.cuda.get_device_name(0),
        "capability": list(torch.cuda.get_device_capability(0)),
        "torch": torch.__version__,
        "faiss_gpus": faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0,
        "expert_backend_bf16": backend,
    }


def layer_ratios(out: Path, repeats: int) -> dict:
    import benchmarks.moe_layer as moe_layer

    args = ["--no-cpu", "--bf16", "--compile", "--skip-experts", "--routers", "token_choice", "expert_choice", "vq"]
    moe_layer.main([*args, "--repeats", str(repeats), "--out", str(out)])
    report = json.loads((out / "moe_layer.json").read_text())
    keep = ("moe/token_choice/dense_ffn", "moe/expert_choice/dense_ffn", "moe/vq/dense_ffn")
    return {
        key: {k: v for k, v in res["ratios"].items() if k in keep} | {"layer_step_ms": res["layer_step_ms"]}
        for key, res in report["results"].items()
    }


def pretrain(stack: str, args: argparse.Namespace, run_dir: Path) -> dict:
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ssroute.config import register_configs
    from ssroute.train.pretrain import run_pretrain

    register_configs()
    GlobalHydra.instance().clear()
    overrides = [
        "data=fashion_mnist",
        f"data.root={args.fashion_root}",
        f"model.stack={stack}",
        f"trainer.max_epochs={args.epochs}",
        "trainer.precision=bf16-mixed",
        "trainer.compile=true",  # the backbone's dense parts; MoE layers stay eager
        "trainer.accelerator=gpu",
        "trainer.progress_bar=false",
        "evaluate=false",
        *args.extra,
    ]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="pretrain", overrides=overrides)
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    run = run_pretrain(cfg, run_dir)
    wall = time.perf_counter() - start
    metrics = json.loads((run / "metrics.json").read_text())
    return {
        "overrides": overrides,
        "wall_s": round(wall, 1),
        "images_per_s": metrics["images_per_s"],
        "train_time_s": metrics["train_time_s"],
        "monitor_time_s": metrics.get("monitor_time_s"),
        "peak_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
        "knn_top1": metrics.get("knn_top1"),
        "linear_top1": metrics.get("linear_top1"),
    }


def attempt(name: str, fn, results: dict) -> None:
    start = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as err:  # record and go on: one run should report every part that works
        results[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=8)}
    results[name + "_seconds"] = round(time.perf_counter() - start, 1)
    print(name, json.dumps(results[name], default=str)[:2000], flush=True)


def markdown(report: dict) -> str:
    lines = ["# GPU path", "", f"Command: `{report['command']}`", ""]
    facts = report["results"].get("device", {})
    lines.append("Device: " + ", ".join(f"{k} {v}" for k, v in facts.items()))
    lines += ["", "## MoE layer / dense FFN (fwd+bwd, bfloat16 autocast)", ""]
    layers = report["results"].get("layer", {})
    if "error" in layers:
        lines.append(f"failed: {layers['error']}")
    else:
        lines += ["| case | token_choice | expert_choice | vq |", "| --- | ---: | ---: | ---: |"]
        for key, r in layers.items():
            ms = r["layer_step_ms"]
            for prefix in ("", "compiled/"):
                cells = []
                for router in ("token_choice", "expert_choice", "vq"):
                    name, dense = f"{prefix}moe/{router}", f"{prefix}dense_ffn"
                    cells.append(f"{ms[name] / ms[dense]:.2f}x" if name in ms and dense in ms else "-")
                lines.append(f"| {key}{', compiled' if prefix else ''} | {' | '.join(cells)} |")
    lines += ["", "## Pretraining on Fashion-MNIST (trainer.precision=bf16-mixed, trainer.compile=true)", "",
              "| stack | images/s | peak memory MiB | train s | monitor s | wall s | knn_top1 |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for name in ("routed", "dense"):
        r = report["results"].get(name, {})
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][:200]} | | | | | |")
        elif r:
            lines.append(
                f"| {name} | {r['images_per_s']:.0f} | {r['peak_memory_mib']:.0f} | {r['train_time_s']:.1f} | {r['monitor_time_s']} | {r['wall_s']:.1f} | {r['knn_top1']} |"
            )
    routed, dense = report["results"].get("routed", {}), report["results"].get("dense", {})
    if "images_per_s" in routed and "images_per_s" in dense:
        lines += ["", f"Routed / dense images/s: {routed['images_per_s'] / dense['images_per_s']:.2f}x"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--fashion-root", type=Path, default=ROOT / "runs" / "fashion-mnist", help="folder with the Fashion-MNIST idx files"
    )
    parser.add_argument("--epochs", type=int, default=6, help="pretraining epochs per stack")
    parser.add_argument("--repeats", type=int, default=21, help="interleaved repeats of the layer timing")
    parser.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for both pretraining runs")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device; run this script on a GPU machine.")
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        attempt("device", device_facts, results)
        attempt("layer", lambda: layer_ratios(Path(tmp), args.repeats), results)
        attempt("routed", lambda: pretrain("[ssl,route,ssl]", args, Path(tmp) / "routed"), results)
        attempt("dense", lambda: pretrain("[ssl,dense,ssl]", args, Path(tmp) / "dense"), results)
    report = {
        "command": "python benchmarks/gpu.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip(),
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    text = markdown(report)
    (args.out / "gpu.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
