"""Linear layers of many experts over expert-sorted rows, in as few calls as the device allows.

An MLP expert bank computes, for rows sorted by expert (``sizes[e]`` rows for
expert ``e``), ``y = act(x W_1[e] + b_1[e]) ... W_L[e] + b_L[e]`` with weights
stacked along a leading expert axis ``[experts, fan_in, fan_out]``. Three
executions, picked per call by :func:`pick_backend`:

- ``grouped_mm``: torch's grouped GEMM (``torch.nn.functional.grouped_mm``, the
  kernel of ``torch._grouped_mm``; MegaBlocks, Gale et al. 2022, and torchtitan
  run MoE experts this way): one kernel per layer for all experts, with jagged
  row counts. On CUDA devices of compute capability 8.0 or newer when the layer
  computes in bfloat16 (``trainer.precision=bf16-mixed``), which is what the
  kernel supports.
- ``bmm``: when every expert has the same number of rows (expert choice fills
  every buffer exactly): one batched product per layer over ``[experts, rows,
  fan_in]`` — on CPU this saves the loop's per-expert calls, a tenth of the
  layer's step at 32 images.
- ``loop``: otherwise, one ``addmm`` per expert and layer on its contiguous block.

All three give the same values and gradients (``tests/experts/test_grouped.py``).

>>> import torch
>>> x, w, b = torch.randn(6, 4), torch.randn(2, 4, 3), torch.zeros(2, 3)
>>> ys = [expert_mlp(x, [3, 3], [w], [b], "relu", backend) for backend in ("loop", "bmm")]
>>> torch.allclose(ys[0], ys[1]) and torch.allclose(ys[0][:3], x[:3] @ w[0])
True
>>> pick_backend("cuda", torch.bfloat16, (9, 0), True, [5, 7]), pick_backend("cpu", torch.float32, None, True, [5, 7])
('grouped_mm', 'loop')
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


def pick_backend(device_type: str, dtype: torch.dtype, capability: tuple[int, int] | None, has_grouped_mm: bool, sizes: list[int]) -> str:
    """``grouped_mm`` where torch's grouped GEMM kernel runs (CUDA, SM >= 8.0, bfloat16); else ``bmm`` for equal blocks, else ``loop``."""
    if has_grouped_mm and device_type == "cuda" and dtype == torch.bfloat16 and capability is not None and capability >= (8, 0):
        return "grouped_mm"
    if len(sizes) > 1 and len(set(sizes)) == 1 and sizes[0] > 0:
        return "bmm"
    return "loop"


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the layer's matrix products run in: the autocast dtype under autocast, else ``x``'s."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def backend_for(x: Tensor, sizes: list[int]) -> str:
    """:func:`pick_backend` for the device and dtype of ``x`` and the block sizes."""
    capability = torch.cuda.get_device_capability(x.device) if x.device.type == "cuda" else None
    return pick_backend(x.device.type, compute_dtype(x), capability, hasattr(F, "grouped_mm"), sizes)


def expert_mlp(
    x: Tensor,
    sizes: list[int],
    weights: list[Tensor],
    biases: list[Tensor | None],
    activation: str | Callable[[Tensor], Tensor],
    backend: str | None = None,
) -> Tensor:
    """``x [rows, fan_in]`` sorted by expert -> ``[rows, fan_out]`` through each row's expert's MLP.

    Args:
        x: expert-sorted rows.
        sizes: rows per expert (host ints, ``len == experts``).
        weights: per layer ``[experts, fan_in, fan_out]``.
        biases: per layer ``[experts, fan_out]`` or None.
        activation: ``gelu``, ``relu`` or ``silu``, or an activation module (between layers, not after the last);
            a module keeps its hooks (pruning masks scale hidden units through them).
        backend: ``grouped_mm``, ``bmm`` or ``loop``; None = :func:`backend_for`.
    """
    backend = backend or backend_for(x, sizes)
    act = ACTIVATIONS[activation] if isinstance(activation, str) else activation
    last = len(weights) - 1
    if backend == "grouped_mm":
        return _grouped_mm_mlp(x, sizes, weights, biases, act)
    if backend == "bmm":
        h = x.view(len(sizes), sizes[0], x.shape[1])
        for layer, (w, b) in enumerate(zip(weights, biases, strict=True)):
            h = torch.bmm(h, w) if b is None else torch.baddbmm(b.unsqueeze(1), h, w)
            h = act(h) if layer < last else h
        return h.reshape(x.shape[0], -1)
    # unbind once: its backward stacks the per-expert grads in one allocation,
    # where indexing w[e] per expert would allocate a full-size zero grad each time.
    per_expert = [(w.unbind(0), b.unbind(0) if b is not None else None) for w, b in zip(weights, biases, strict=True)]
    outputs = []
    for e, rows in enumerate(x.split(sizes)):
        if rows.shape[0] == 0:
            outputs.append(rows.new_empty(0, weights[-1].shape[2]))
            continue
        h = rows
        for layer, (w, b) in enumerate(per_expert):
            h = torch.mm(h, w[e]) if b is None else torch.addmm(b[e], h, w[e])
            h = act(h) if layer < last else h
        outputs.append(h)
    return torch.cat(outputs)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient (grouped_mm's backward needs one)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous()


def _grouped_mm_mlp(x: Tensor, sizes: list[int], weights: list[Tensor], biases: list[Tensor | None], act) -> Tensor:
    dtype = compute_dtype(x)
    offsets = torch.tensor(list(accumulate(sizes)), dtype=torch.int32, device=x.device)
    expert_of_row = torch.repeat_interleave(
        torch.arange(len(sizes), device=x.device), torch.tensor(sizes, device=x.device), output_size=x.shape[0]
    )
    h = x.to(dtype)
    with torch.autocast(x.device.type, enabled=False):  # the kernel takes the compute dtype as given; autocast must not recast it
        for layer, (w, b) in enumerate(zip(weights, biases, strict=True)):
            h = _ContiguousGrad.apply(F.grouped_mm(h, w.to(dtype), offs=offsets))
            if b is not None:  # the kernel has no bias yet
                h = h + b.to(dtype).index_select(0, expert_of_row)
            if layer < len(weights) - 1:
                h = act(h)
    return h


__all__ = ["ACTIVATIONS", "backend_for", "compute_dtype", "expert_mlp", "pick_backend"]
