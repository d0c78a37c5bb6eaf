"""Fast kernels for the narrow expert axis of ``[tokens, experts]`` tensors.

With few experts (``E = 8``) and many tokens, reductions along the last axis
of a ``[tokens, experts]`` tensor are slow on CPUs: each row is too short to
vectorise (a softmax over ``[12544, 8]`` costs ~20x more than over the same
values laid out ``[8, 12544]`` and reduced along dim 0). Routers therefore
compute logits in the ``[experts, tokens]`` layout and expose them as a
transposed ``[tokens, experts]`` view; these helpers reduce along the long
axis whenever the layout allows. Results are identical, only faster.

>>> import torch
>>> gate = torch.nn.Linear(4, 3, bias=False)
>>> x = torch.randn(5, 4)
>>> torch.allclose(softmax_experts(gate_logits(gate, x)), torch.softmax(gate(x), -1))
True
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def gate_logits(gate: nn.Linear, tokens: Tensor) -> Tensor:
    """``[tokens, experts]`` logits of a bias-free linear gate, as a view of ``[experts, tokens]``."""
    return (gate.weight @ tokens.t()).t()


def softmax_experts(logits: Tensor) -> Tensor:
    """Softmax over the expert axis of ``[tokens, experts]`` (float32 math)."""
    transposed = logits.t()
    if not transposed.is_contiguous():
        return torch.softmax(logits.float(), dim=-1).to(logits.dtype)
    return torch.softmax(transposed.float(), dim=0).to(logits.dtype).t()


def top_experts(scores: Tensor, k: int) -> Tensor:
    """``[tokens, k]`` indices of the k largest scores per token (``max`` for k=1: faster than ``topk``)."""
    if k == 1:  # max(...).indices: argmax along dim 0 takes a slow path on CPU
        if scores.t().is_contiguous():
            return scores.t().max(dim=0).indices.unsqueeze(1)
        return scores.max(dim=-1).indices.unsqueeze(1)
    return torch.topk(scores, k, dim=-1).indices


def randn_like_experts(logits: Tensor) -> Tensor:
    """Standard normal noise shaped like ``logits``, generated in its ``[experts, tokens]`` layout."""
    if logits.t().is_contiguous():
        return torch.randn(logits.t().shape, dtype=logits.dtype, device=logits.device).t()
    return torch.randn_like(logits)


class LinearGate(nn.Linear):
    """A bias-free linear gate ``[tokens, dim] -> [tokens, experts]`` logits (as a view of ``[experts, tokens]``).

    With ``cosine_scale`` set, the logits are ``scale * cos(token, w_e)``: tokens and expert
    vectors are L2-normalised first, as SwAV's prototypes (Caron et al. 2020) and X-MoE's
    cosine router (Chi et al. 2022, arXiv 2204.09179). Confidence then comes from
    direction alone and is bounded by the scale, so a router cannot buy sharp
    distributions with large weights, and weight decay does not flatten it.

    >>> import torch
    >>> gate = LinearGate(4, 3, cosine_scale=10.0)
    >>> bool(gate(torch.randn(5, 4)).abs().max() <= 10.0 + 1e-5)
    True

    Args:
        dim: token width.
        num_experts: experts ``E``.
        cosine_scale: None = a plain linear gate; a number = the cosine gate's scale (inverse temperature).
    """

    def __init__(self, dim: int, num_experts: int, cosine_scale: float | None = None) -> None:
        super().__init__(dim, num_experts, bias=False)
        self.cosine_scale = cosine_scale

    def forward(self, tokens: Tensor) -> Tensor:
        if self.cosine_scale is None:
            return (self.weight @ tokens.t()).t()
        weight = nn.functional.normalize(self.weight, dim=-1)
        return (weight @ nn.functional.normalize(tokens, dim=-1).t()).t() * self.cosine_scale
