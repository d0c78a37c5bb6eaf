"""Accuracy retained by upcycled (MoEfied) classifiers as k goes from E to 1, and FFN activation sparsity.

For each dense classifier checkpoint (``python -m finetune`` run: backbone + head):

1. test accuracy of the dense model;
2. upcycle every FFN into ``E`` experts (``ssroute.upcycle``) twice —
   MLP selection router (trained on the FFN inputs of training images) and random
   selection — and evaluate test accuracy with k = E, E/2, ..., 1 experts per
   token, with no further training (the head and all other weights unchanged);
3. activation sparsity of each dense FFN on the test images: the share of hidden
   activations with ``|a| < 0.01`` and the share ``<= 0`` (exactly 0 for ReLU).

    python benchmarks/upcycle.py --checkpoint digits_relu=RUN digits_gelu=RUN fmnist=RUN

Writes ``benchmarks/results/upcycle.{json,md}`` and ``benchmarks/results/activation_sparsity.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssroute.checkpoint import load_pretrained, resolve_checkpoint  # noqa: E402
from ssroute.data import build_data  # noqa: E402
from ssroute.models import build_backbone  # noqa: E402
from ssroute.moe import MoELayer  # noqa: E402
from ssroute.upcycle.run import _normalized, backbone_config, upcycle_checkpoint  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
THRESHOLD = 0.01


def _classifier(config: dict, state: dict, data) -> nn.Module:
    backbone = build_backbone(backbone_config(config), data.image_size, data.channels)
    backbone.load_state_dict({k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")})
    head = nn.Sequential(nn.BatchNorm1d(backbone.dim, affine=False), nn.Linear(backbone.dim, data.num_classes))
    head.load_state_dict({k[len("head.") :]: v for k, v in state.items() if k.startswith("head.")})
    return _Classifier(backbone, head).eval()


class _Classifier(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images)[0])


@torch.no_grad()
def _top1(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 1000) -> float:
    correct = sum(int((model(images[i : i + batch]).argmax(1) == labels[i : i + batch]).sum()) for i in range(0, len(labels), batch))
    return correct / len(labels)


@torch.no_grad()
def _sparsity(backbone: nn.Module, images: torch.Tensor, batch: int = 1000) -> list[dict[str, float]]:
    stats = [{"near_zero": 0.0, "nonpositive": 0.0, "count": 0.0} for _ in backbone.blocks]
    hooks = []
    for i, block in enumerate(backbone.blocks):

        def hook(module, args, out, i=i) -> None:
            stats[i]["near_zero"] += float((out.abs() < THRESHOLD).sum())
            stats[i]["nonpositive"] += float((out <= 0).sum())
            stats[i]["count"] += out.numel()

        hooks.append(block.ffn.act.register_forward_hook(hook))
    for start in range(0, images.shape[0], batch):
        backbone(images[start : start + batch])
    for h in hooks:
        h.remove()
    return [{"near_zero": s["near_zero"] / s["count"], "nonpositive": s["nonpositive"] / s["count"]} for s in stats]


def run_checkpoint(name: str, path: str, args) -> tuple[dict, dict]:
    file = resolve_checkpoint(path)
    config, _ = load_pretrained(str(file))
    state = torch.load(file, map_location="cpu", weights_only=False)["state_dict"]
    data = build_data(OmegaConf.create(config["data"]), 0)
    images, labels = _normalized(data.test.images, data), data.test.labels
    dense = _classifier(config, state, data)
    result = {"checkpoint": str(file), "data": data.name, "activation": config["model"]["activation"], "test_images": len(labels)}
    result["dense_top1"] = _top1(dense, images, labels)
    sparsity = {
        "checkpoint": str(file),
        "data": data.name,
        "activation": config["model"]["activation"],
        "per_block": _sparsity(dense.backbone, images),
    }
    for selection in ("mlp", "random"):
        start = time.perf_counter()
        upcycled = upcycle_checkpoint(
            str(file), num_experts=args.experts, selection=selection, k=args.experts, steps=args.steps, images=args.images
        )
        model = _classifier(upcycled["hyper_parameters"]["config"], upcycled["state_dict"], data)
        accuracy = {}
        for k in args.ks:
            for layer in model.modules():
                if isinstance(layer, MoELayer):
                    layer.set_k(k)
            accuracy[str(k)] = _top1(model, images, labels)
        result[selection] = {
            "top1_by_k": accuracy,
            "router_fit": upcycled["upcycle"]["router_fit"],
            "seconds": round(time.perf_counter() - start, 1),
        }
        print(f"{name} {selection}: {accuracy}", flush=True)
    print(f"{name} dense: {result['dense_top1']:.4f}", flush=True)
    return result, sparsity


def _markdown(report: dict, ks: list[int]) -> tuple[str, str]:
    head = f"Command: `{report['command']}`\n\nMachine: {report['machine']}; 1-min load average {report['load'][0]:.2f} -> {report['load'][1]:.2f}.\n"
    up = ["# Upcycled FFNs: accuracy retained as k goes from E to 1", "", head,
          f"Every FFN of each dense classifier split into E={report['experts']} experts by balanced k-means; no training after upcycling "
          f"except the MLP selection routers ({report['steps']} steps on the FFN inputs of {report['images']} training images). Test top-1:", "",
          "| model | dense | selection | " + " | ".join(f"k={k}" for k in ks) + " |",
          "| --- | ---: | --- | " + " | ".join("---:" for _ in ks) + " |"]  # fmt: skip
    sp = ["# Activation sparsity of the dense FFNs", "", head,
          f"Share of hidden activations (after the activation function, all test images and tokens) with |a| < {THRESHOLD} "
          "(near zero) and with a <= 0 (exactly zero for ReLU), per block.", "",
          "| model | activation | block | near zero (abs(a) < 0.01) | a <= 0 |", "| --- | --- | ---: | ---: | ---: |"]  # fmt: skip
    for name, res in report["upcycle"].items():
        for selection in ("mlp", "random"):
            accs = res[selection]["top1_by_k"]
            up.append(f"| {name} | {res['dense_top1']:.4f} | {selection} | " + " | ".join(f"{accs[str(k)]:.4f}" for k in ks) + " |")
        s = report["sparsity"][name]
        for i, block in enumerate(s["per_block"]):
            sp.append(f"| {name} | {s['activation']} | {i} | {block['near_zero']:.3f} | {block['nonpositive']:.3f} |")
    return "\n".join(up) + "\n", "\n".join(sp) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", nargs="+", required=True, help="NAME=RUN_FOLDER_OR_CKPT of dense fine-tuned classifiers")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--ks", type=int, nargs="+", default=None, help="default: E, E/2, ..., 1")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1, help="1: fastest for these small matrices on a shared machine")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.ks = args.ks or [k for k in (args.experts, args.experts // 2, args.experts // 4, 1) if k >= 1]
    args.ks = sorted(set(args.ks), reverse=True)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before = os.getloadavg()
    report = {"command": "python benchmarks/upcycle.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {args.threads} threads",
              "experts": args.experts, "steps": args.steps, "images": args.images, "upcycle": {}, "sparsity": {}}  # fmt: skip
    for item in args.checkpoint:
        name, _, path = item.partition("=")
        report["upcycle"][name], report["sparsity"][name] = run_checkpoint(name, path, args)
    report["load"] = [load_before[0], os.getloadavg()[0]]
    up_md, sp_md = _markdown(report, args.ks)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "upcycle.json").write_text(json.dumps({k: v for k, v in report.items() if k != "sparsity"}, indent=2) + "\n")
    (args.out / "activation_sparsity.json").write_text(json.dumps({k: v for k, v in report.items() if k != "upcycle"}, indent=2) + "\n")
    (args.out / "upcycle.md").write_text(up_md)
    (args.out / "activation_sparsity.md").write_text(sp_md)
    print(up_md + "\n" + sp_md)


if __name__ == "__main__":
    main()
