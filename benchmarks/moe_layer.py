"""Speed of the MoE layer per router against dense and naive baselines.

Times one training step (forward + backward) of ``[images, tokens, dim]``
through:

- ``dense_ffn``: a dense FFN with the active size of one expert (k=1);
- ``moe/<router>``: ``ssroute.build_moe`` with every registered router
  (default options, k=1), executed by sort-and-gather;
- ``vmoe_einsum``: the token-choice routing executed by V-MoE's dense one-hot
  ``[tokens, experts, capacity]`` dispatch/combine einsums;
- ``expert_loop``: the token-choice routing executed by a Python loop over
  experts that masks, gathers and scatters per expert;

the routing decision alone (router forward + backward in training, and
forward without gradients in eval = inference), and each expert type
(``ssroute.experts.EXPERTS``) behind the same token-choice router: one training
step and one inference forward (eval, no gradients). Measurements are interleaved
round-robin (every repeat times every case once) and the median is reported,
so a load change on a shared machine hits all cases alike. The load average is
recorded with the results.

    python benchmarks/moe_layer.py            # default: 256 x 49 tokens, D=128, hidden 512, E=8
    python benchmarks/moe_layer.py --quick    # small smoke run
    python benchmarks/moe_layer.py --only experts   # re-time the expert types only, keep the rest of the results
    python benchmarks/moe_layer.py --threads 1 --routers token_choice expert_choice vq --compile --skip-experts

Writes ``benchmarks/results/moe_layer.json`` and ``benchmarks/results/moe_layer.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssroute.experts import EXPERTS  # noqa: E402
from ssroute.layers.mlp import FeedForward  # noqa: E402
from ssroute.moe import build_moe, dense_reference  # noqa: E402
from ssroute.routing import ROUTERS  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_IMAGES = 256
TARGET_ROUTERS = ("token_choice", "expert_choice", "vq")  # the layer must beat the dense FFN with these
LAYER_TARGETS = {256: 0.90, 32: 1.2}  # MoE fwd+bwd / dense FFN fwd+bwd at this many images


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _expert_loop(moe, flat: torch.Tensor, routing) -> torch.Tensor:
    """Naive execution: for each expert, mask its pairs, gather, run, scatter."""
    bank, out = moe.experts, torch.zeros_like(flat)
    for e in range(bank.num_experts):
        mask = routing.expert == e
        token, weight = routing.token[mask], routing.weight[mask]
        h = bank.act(torch.addmm(bank.b_in[e], flat[token], bank.w_in[e]))
        y = torch.addmm(bank.b_out[e], h, bank.w_out[e])
        out = out.index_add(0, token, y * weight.unsqueeze(1))
    return out


def _layer_cases(args, device: torch.device) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    common = {"dim": args.dim, "hidden": args.hidden, "num_experts": args.experts}
    cases: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    dense = FeedForward(args.dim, args.hidden).to(device)
    cases["dense_ffn"] = dense
    for name in args.routers or ROUTERS.names():
        cases[f"moe/{name}"] = build_moe(router=name, **common).to(device)
    if args.compile:  # torch.compile as an option: the same modules, compiled (graph breaks where routing needs host values)
        for name in ("dense_ffn", *(f"moe/{r}" for r in TARGET_ROUTERS)):
            if name in cases:
                cases[f"compiled/{name}"] = torch.compile(cases[name])
    slots = math.ceil(args.tokens / args.experts)  # as many slot rows as tokens: the dense FFN's compute
    cases[f"moe/soft_moe(slots={slots})"] = build_moe(router="soft_moe", slots_per_expert=slots, **common).to(device)
    reference = build_moe(router="token_choice", **common).to(device)

    def vmoe(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, args.dim)
        return dense_reference(reference.experts, flat, reference.router(flat, args.tokens)).view_as(x)

    def loop(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, args.dim)
        return _expert_loop(reference, flat, reference.router(flat, args.tokens)).view_as(x)

    cases["vmoe_einsum"] = vmoe
    cases["expert_loop"] = loop
    return cases


def _router_cases(args, device: torch.device) -> dict[str, Callable[[], None]]:
    x = torch.randn(args.images * args.tokens, args.dim, device=device, requires_grad=True)
    cases: dict[str, Callable[[], None]] = {}
    for name in args.routers or ROUTERS.names():
        router = build_moe(router=name, dim=args.dim, hidden=8, num_experts=args.experts).router.to(device)

        def train_step(router=router) -> None:
            routing = router.train()(x, args.tokens)
            loss = routing.weight.sum() + routing.aux_loss
            if loss.requires_grad:
                loss.backward()

        def infer(router=router) -> None:
            with torch.no_grad():
                router.eval()(x, args.tokens)

        cases[f"train/{name}"] = train_step
        cases[f"infer/{name}"] = infer
    return cases


EXPERT_VARIANTS = {
    "mlp(depth=3)": ("mlp", {"depth": 3}),
    "lut(key=hash)": ("lut", {"key": "hash"}),
    "hyper(rank=full)": ("hyper", {"rank": None}),
}


def run_experts(args, device: torch.device) -> dict:
    """Training step and inference forward of the layer per expert type (token_choice router, k=1)."""
    torch.manual_seed(0)
    common = {"dim": args.dim, "hidden": args.hidden, "num_experts": args.experts}
    x = torch.randn(args.images, args.tokens, args.dim, device=device, requires_grad=True)
    layers: dict[str, torch.nn.Module] = {"dense_ffn": FeedForward(args.dim, args.hidden).to(device)}
    variants = {name: (name, {}) for name in EXPERTS.names()} | EXPERT_VARIANTS
    for label, (name, options) in variants.items():
        layers[label] = build_moe(router="token_choice", experts=name, **common, **options).to(device)

    def step(module) -> Callable[[], None]:
        def fn() -> None:
            x.grad = None
            module.train()(x).sum().backward()

        return fn

    def infer(module) -> Callable[[], None]:
        def fn() -> None:
            with torch.no_grad():
                module.eval()(x)

        return fn

    load_before = os.getloadavg()
    cases = {f"train/{n}": step(m) for n, m in layers.items()} | {f"infer/{n}": infer(m) for n, m in layers.items()}
    ms = _interleaved(cases, args.repeats, args.warmup, device)
    params = {n: sum(p.numel() for p in m.parameters()) for n, m in layers.items()}
    flops = {n: (m.experts.flops_per_row(args.tokens) if n != "dense_ffn" else 4.0 * args.dim * args.hidden) for n, m in layers.items()}
    return {
        "images": args.images,
        "train_ms": {n: ms[f"train/{n}"] for n in layers},
        "infer_ms": {n: ms[f"infer/{n}"] for n in layers},
        "params": params,
        "flops_per_row": flops,
        "loadavg_1min_before_after": [load_before[0], os.getloadavg()[0]],
    }


def _expert_markdown(section: dict) -> list[str]:
    lines = ["", "## Expert types", "", f"Command: `{section['command']}`. Each expert type behind the token_choice router "
             "(k=1, capacity factor 1.25, default expert options unless named), one training step (forward + backward) and one "
             "inference forward (eval mode, no gradients); dense_ffn is the FFN of one expert's size."]  # fmt: skip
    for key, res in section["results"].items():
        load = res["loadavg_1min_before_after"]
        lines += ["", f"### {key} (1-min load average {load[0]:.2f} -> {load[1]:.2f})", "",
                  "| layer | train ms | / dense | infer ms | / dense | params | expert FLOPs / row |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
        dt, di = res["train_ms"]["dense_ffn"], res["infer_ms"]["dense_ffn"]
        for name in res["train_ms"]:
            t, i = res["train_ms"][name], res["infer_ms"][name]
            label = name if name == "dense_ffn" else f"moe/{name}"
            lines.append(
                f"| {label} | {t:.1f} | {t / dt:.2f} | {i:.1f} | {i / di:.2f} | {res['params'][name]:,} | {res['flops_per_row'][name]:,.0f} |"
            )
    return lines


def _interleaved(cases: dict[str, Callable[[], None]], repeats: int, warmup: int, device: torch.device) -> dict[str, float]:
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def run_device(args, device: torch.device) -> dict:
    """All timings for ``args.images`` images on ``device``."""
    torch.manual_seed(0)
    x = torch.randn(args.images, args.tokens, args.dim, device=device, requires_grad=True)
    layers = _layer_cases(args, device)

    def step(module) -> Callable[[], None]:
        def fn() -> None:
            x.grad = None
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                y = module(x)
            y.float().sum().backward()

        return fn

    load_before = os.getloadavg()
    layer_ms = _interleaved({name: step(m) for name, m in layers.items()}, args.repeats, args.warmup, device)
    router_ms = _interleaved(_router_cases(args, device), args.repeats, args.warmup, device)
    load_after = os.getloadavg()
    rows: dict[str, dict[str, float]] = {}  # expert rows computed per token, and dropped share, as routed
    for name, module in layers.items():
        if name.startswith("moe/"):
            with torch.no_grad():
                _, routing = module.forward_with_routing(x)
            total = x.shape[0] * x.shape[1]
            rows[name] = {"rows_per_token": float(routing.load().sum()) / total, "dropped": float(routing.num_dropped) / total}
    dense = layer_ms["dense_ffn"]
    ratios = {f"{name}/dense_ffn": ms / dense for name, ms in layer_ms.items() if name != "dense_ffn"}
    if "train/token_choice" in router_ms:
        linear = router_ms["train/token_choice"], router_ms["infer/token_choice"]
        for name in ("vq", "hash"):
            if f"train/{name}" in router_ms:
                ratios[f"router_train/{name}/token_choice"] = router_ms[f"train/{name}"] / linear[0]
                ratios[f"router_infer/{name}/token_choice"] = router_ms[f"infer/{name}"] / linear[1]
    if "train/hungarian" in router_ms:
        ratios["hungarian_router_share_of_layer_step"] = router_ms["train/hungarian"] / layer_ms["moe/hungarian"]
    return {
        "images": args.images,
        "layer_step_ms": layer_ms,
        "router_ms": router_ms,
        "expert_rows": rows,
        "ratios": ratios,
        "loadavg_1min_before_after": [load_before[0], load_after[0]],
    }


def _markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        "# MoE layer speed",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {report['machine']['cpu']}{', ' + report['machine']['gpu'] if 'gpu' in report['machine'] else ''}, "
        f"torch {report['machine']['torch']}, {s['threads']} threads{', bfloat16 autocast' if s.get('bf16') else ''}; "
        f"{' and '.join(map(str, s['images']))} images x {s['tokens']} tokens, dim {s['dim']}, hidden {s['hidden']}, {s['experts']} experts, k=1, "
        f"median of {s['repeats']} interleaved repeats after {s['warmup']} warmup steps.",
    ]
    for key, res in report["results"].items():
        dense = res["layer_step_ms"]["dense_ffn"]
        load = res["loadavg_1min_before_after"]
        lines += ["", f"## {key} (1-min load average {load[0]:.2f} -> {load[1]:.2f})"]
        lines += [
            "",
            "| layer (forward + backward) | ms | / dense FFN | expert rows / token | dropped |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for name, ms in res["layer_step_ms"].items():
            row = res["expert_rows"].get(name)
            extra = (
                f"{row['rows_per_token']:.2f} | {100 * row['dropped']:.1f}%"
                if row
                else ("1.00 | -" if name == "dense_ffn" else "as token_choice | -")
            )
            lines.append(f"| {name} | {ms:.1f} | {ms / dense:.2f} | {extra} |")
        lines += ["", "| router | train fwd+bwd ms | / token_choice | infer ms | / token_choice |", "| --- | ---: | ---: | ---: | ---: |"]
        base_train, base_infer = res["router_ms"]["train/token_choice"], res["router_ms"]["infer/token_choice"]
        for name in ROUTERS.names():
            if f"train/{name}" not in res["router_ms"] or "train/token_choice" not in res["router_ms"]:
                continue  # a router not timed in this run
            train, infer = res["router_ms"][f"train/{name}"], res["router_ms"][f"infer/{name}"]
            lines.append(f"| {name} | {train:.2f} | {train / base_train:.2f} | {infer:.2f} | {infer / base_infer:.2f} |")
        r = res["ratios"]
        lines += ["", "| target | measured | met |", "| --- | ---: | :---: |"]
        bound = LAYER_TARGETS.get(res["images"])
        for name in TARGET_ROUTERS:
            for prefix in ("", "compiled/"):
                key = f"{prefix}moe/{name}/dense_ffn"
                if bound is not None and key in r:
                    versus = "compiled dense FFN" if prefix else "dense FFN"
                    value = (
                        r[key] if not prefix else res["layer_step_ms"][f"compiled/moe/{name}"] / res["layer_step_ms"]["compiled/dense_ffn"]
                    )
                    lines.append(f"| {prefix}moe/{name} <= {bound:.2f}x {versus} | {value:.2f}x | {'yes' if value <= bound else 'no'} |")
        if res["images"] != TARGET_IMAGES:
            continue  # the reference rows are stated for 256 images
        lines += [
            f"| V-MoE einsum dispatch / dense FFN (reference) | {r['vmoe_einsum/dense_ffn']:.2f}x | - |",
            f"| per-expert loop / dense FFN (reference) | {r['expert_loop/dense_ffn']:.2f}x | - |",
        ]
        for name in ("vq", "hash"):
            for mode in ("train", "infer"):
                if f"router_{mode}/{name}/token_choice" in r:
                    v = r[f"router_{mode}/{name}/token_choice"]
                    lines.append(f"| {name} router ({mode}) <= linear softmax router | {v:.2f}x | {'yes' if v <= 1.0 else 'no'} |")
        if "hungarian_router_share_of_layer_step" in r:
            share = r["hungarian_router_share_of_layer_step"]
            lines.append(f"| exact Hungarian matching <= 25% of the layer step | {100 * share:.1f}% | {'yes' if share <= 0.25 else 'no'} |")
    if "expert_types" in report:
        lines += _expert_markdown(report["expert_types"])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run (32 images, 3 repeats)")
    parser.add_argument("--images", type=int, nargs="+", default=[256, 32], help="batch sizes; targets are at 256")
    parser.add_argument("--tokens", type=int, default=49)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (torch.set_num_threads)")
    parser.add_argument("--routers", nargs="*", default=None, help="routers to time (default: every registered one)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd dense FFN and MoE layers (target routers)")
    parser.add_argument("--skip-experts", action="store_true", help="skip the expert-types section")
    parser.add_argument("--no-cuda", action="store_true", help="skip CUDA even when present")
    parser.add_argument("--no-cpu", action="store_true", help="time CUDA only (the GPU script)")
    parser.add_argument("--bf16", action="store_true", help="layers under bfloat16 autocast (on CUDA: the grouped-GEMM expert path)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--only", choices=["all", "experts"], default="all", help="experts: time the expert types only and keep the other results"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.repeats, args.warmup = [32], 3, 1
    torch.set_num_threads(args.threads)
    sizes = list(args.images)
    devices = [] if args.no_cpu else [torch.device("cpu")]
    if torch.cuda.is_available() and not args.no_cuda:
        devices.append(torch.device("cuda"))
    command = "python benchmarks/moe_layer.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    report = {
        "command": command,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__},
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "results": {},
    }
    try:
        with open("/proc/cpuinfo") as f:
            report["machine"]["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if args.only == "experts" and (args.out / "moe_layer.json").is_file():
        previous = json.loads((args.out / "moe_layer.json").read_text())
        report = previous | {"expert_types": {}}
    experts_section = {"command": command, "results": {}}
    for device in devices:
        if device.type == "cuda":
            report["machine"]["gpu"] = torch.cuda.get_device_name(device)
        for images in sizes:
            args.images = images
            if args.only == "all":
                print(f"timing {images} images on {device} ...", flush=True)
                report["results"][f"{device}, {images} images"] = run_device(args, device)
            if not args.skip_experts:
                print(f"timing expert types, {images} images on {device} ...", flush=True)
                experts_section["results"][f"{device}, {images} images"] = run_experts(args, device)
        args.images = sizes
    if experts_section["results"]:
        report["expert_types"] = experts_section
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "moe_layer.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = _markdown(report)
    (args.out / "moe_layer.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
