"""Expert capacity: buffer sizes and which (token, expert) pairs fit.

Capacity follows V-MoE (Riquelme et al. 2021, "Scaling Vision with Sparse
Mixture of Experts"): each expert has a buffer of
``ceil(capacity_factor * k * group_tokens / experts)`` rows per group, filled in
priority order; pairs that find it full are dropped (the block's residual
carries their token).

Everything here is sort-based — a stable ``argsort`` over ``[pairs]`` plus a
``bincount`` — never a ``[tokens, experts, capacity]`` one-hot.

>>> import torch
>>> bucket_positions(torch.tensor([1, 0, 1, 1, 0]), num_buckets=2)
tensor([0, 0, 1, 2, 1])
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def expert_capacity(capacity_factor: float | None, k: float, group_tokens: int, num_experts: int) -> int | None:
    """Rows per expert and group, or None for no limit (``capacity_factor=None``)."""
    if capacity_factor is None:
        return None
    return max(1, math.ceil(capacity_factor * k * group_tokens / num_experts))


def bucket_positions(bucket: Tensor, num_buckets: int) -> Tensor:
    """``[pairs]`` rank of each pair among earlier pairs of the same bucket.

    The order of ``bucket`` is the priority order: the first pair of a bucket
    gets position 0.
    """
    order = torch.argsort(bucket, stable=True)
    counts = torch.bincount(bucket, minlength=num_buckets)
    starts = torch.cumsum(counts, 0) - counts
    sorted_bucket = bucket.index_select(0, order)
    ranks = torch.arange(bucket.numel(), device=bucket.device) - starts.index_select(0, sorted_bucket)
    return torch.empty_like(ranks).scatter_(0, order, ranks)


def within_capacity(token: Tensor, expert: Tensor, group_tokens: int, num_experts: int, capacity: int | None) -> Tensor:
    """``[pairs]`` bool: the pair fits its expert's buffer in its group.

    Pairs must be given in priority order (earlier pairs win a full buffer).
    """
    if capacity is None:
        return torch.ones_like(token, dtype=torch.bool)
    group = torch.div(token, group_tokens, rounding_mode="floor")
    # Buckets are (group, expert); bincount's minlength is only a lower bound, so 0 avoids a host sync.
    return bucket_positions(group * num_experts + expert, 0) < capacity


def choice_order(top_experts: Tensor, group_tokens: int, priority: Tensor | None = None) -> Tensor:
    """Flat indices into a top-k choice ``[tokens, k]``, in V-MoE's fill order.

    Within each group every token's first choice comes before any second
    choice, and so on. With ``priority`` ``[tokens]`` (batch priority routing,
    BPR) higher-priority tokens come first within each choice rank; otherwise
    tokens keep their order. Returns ``[groups * k * group_tokens]`` indices
    ``token * k + choice``.
    """
    tokens, k = top_experts.shape
    groups = tokens // group_tokens
    token_ids = torch.arange(tokens, device=top_experts.device).view(groups, group_tokens)
    if priority is not None:
        rank = torch.argsort(priority.view(groups, group_tokens), dim=1, descending=True, stable=True)
        token_ids = torch.gather(token_ids, 1, rank)
    choice = torch.arange(k, device=top_experts.device).view(1, k, 1)
    return (token_ids.unsqueeze(1) * k + choice).reshape(-1)
