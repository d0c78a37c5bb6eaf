"""Grouped expert products (ssroute/experts/grouped.py): every backend agrees, and the device choice is tested on CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssroute.experts import build_experts
from ssroute.experts.grouped import backend_for, compute_dtype, expert_mlp, pick_backend

SM90, SM75 = (9, 0), (7, 5)


@pytest.mark.parametrize(
    ("device", "dtype", "capability", "has_kernel", "sizes", "expected"),
    [
        ("cuda", torch.bfloat16, SM90, True, [3, 5], "grouped_mm"),  # the GPU path of bf16-mixed training
        ("cuda", torch.bfloat16, (8, 0), True, [4, 4], "grouped_mm"),  # grouped GEMM wins over bmm where it runs
        ("cuda", torch.bfloat16, SM75, True, [3, 5], "loop"),  # kernel needs SM >= 8.0
        ("cuda", torch.float32, SM90, True, [3, 5], "loop"),  # kernel takes bfloat16 only
        ("cuda", torch.bfloat16, SM90, False, [3, 5], "loop"),  # torch without grouped_mm
        ("cuda", torch.float32, SM90, True, [4, 4], "bmm"),
        ("cpu", torch.bfloat16, None, True, [3, 5], "loop"),
        ("cpu", torch.float32, None, True, [4, 4, 4], "bmm"),  # expert choice: equal blocks
        ("cpu", torch.float32, None, True, [0, 0], "loop"),  # nothing routed
        ("cpu", torch.float32, None, True, [6], "loop"),  # one expert
    ],
)
def test_pick_backend_covers_every_device_branch(device, dtype, capability, has_kernel, sizes, expected) -> None:
    assert pick_backend(device, dtype, capability, has_kernel, sizes) == expected


def test_autocast_sets_the_compute_dtype_and_cpu_never_takes_the_cuda_kernel() -> None:
    x = torch.randn(4, 8)
    assert compute_dtype(x) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype(x) == torch.bfloat16
        assert backend_for(x, [1, 3]) == "loop"


def _params(sizes: list[int], depth: int, dims=(8, 16, 12, 8)):
    torch.manual_seed(0)
    experts = len(sizes)
    fan = dims[: depth + 1]
    weights = [torch.randn(experts, a, b, requires_grad=True) for a, b in zip(fan[:-1], fan[1:], strict=True)]
    biases = [torch.randn(experts, b, requires_grad=True) for b in fan[1:]]
    return torch.randn(sum(sizes), fan[0], requires_grad=True), weights, biases


def _reference(x, sizes, weights, biases, act):
    out, start = [], 0
    for e, size in enumerate(sizes):
        h = x[start : start + size]
        for layer, (w, b) in enumerate(zip(weights, biases, strict=True)):
            h = h @ w[e] + b[e]
            h = act(h) if layer < len(weights) - 1 else h
        out.append(h)
        start += size
    return torch.cat(out)


def _values_and_grads(fn, x, weights, biases):
    for t in (x, *weights, *biases):
        t.grad = None
    y = fn()
    upstream = torch.linspace(-1, 1, y.numel()).view_as(y)
    (y * upstream).sum().backward()
    return [y.detach(), x.grad.clone(), *(w.grad.clone() for w in weights), *(b.grad.clone() for b in biases)]


BACKENDS = ["loop", "bmm"] + (["grouped_mm"] if hasattr(F, "grouped_mm") else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("depth", [2, 3])
@pytest.mark.parametrize("activation", ["gelu", "relu", "silu"])
def test_every_backend_matches_per_expert_autograd(backend: str, depth: int, activation: str) -> None:
    # grouped_mm runs on CPU in float32 too (slower there than the loop), so its values and gradients are checked here
    sizes = [5, 5, 5] if backend == "bmm" else [4, 0, 7]  # jagged, with an empty expert, except for bmm
    x, weights, biases = _params(sizes, depth)
    act = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}[activation]
    expected = _values_and_grads(lambda: _reference(x, sizes, weights, biases, act), x, weights, biases)
    got = _values_and_grads(lambda: expert_mlp(x, sizes, weights, biases, activation, backend=backend), x, weights, biases)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_mlp_bank_runs_equal_blocks_as_one_batched_product(monkeypatch) -> None:
    bank = build_experts("mlp", dim=8, hidden=16, num_experts=3)
    x = torch.randn(12, 8)
    calls = []
    original = torch.baddbmm
    monkeypatch.setattr(torch, "baddbmm", lambda *a, **k: calls.append(1) or original(*a, **k))
    equal = bank(x, [4, 4, 4], None)
    assert len(calls) == 2  # one batched product per layer
    monkeypatch.setattr(torch, "baddbmm", original)
    torch.testing.assert_close(equal, expert_mlp(x, [4, 4, 4], [bank.w_in, bank.w_out], [bank.b_in, bank.b_out], "gelu", backend="loop"))
