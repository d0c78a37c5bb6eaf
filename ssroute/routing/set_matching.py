"""Hungarian set-matching router: a balanced assignment of tokens to expert slots.

BASE layers (Lewis et al. 2021, "BASE Layers: Simplifying Training of Large,
Sparse Models") route by solving a linear assignment problem so every expert
gets the same number of tokens — the set matching DETR (Carion et al. 2020)
uses for its loss. Per group (image) each expert offers ``capacity`` slots;
token ``n`` matched to a slot of expert ``e`` earns ``logits[n, e]``, and the
matching maximises the total. This is the equipartition constraint of
SwAV-style clustering solved exactly. With ``capacity_factor=1`` the matching
is balanced to within one token per image: every expert takes at least
``floor(n / E)`` and at most ``ceil(n / E)`` of the ``n`` tokens, also when ``E``
does not divide ``n`` (a plain capacity of ``ceil(n / E)`` would allow loads
such as ``[3, 1, 3, 3]`` for ``n = 10, E = 4``).

- ``solver="exact"``: ``scipy.optimize.linear_sum_assignment`` per group on the
  ``[group_tokens, experts * capacity]`` cost matrix (CPU, one call per image);
- ``solver="sinkhorn"``: the sinkhorn plan, then greedy rounds in which every
  unmatched token takes its best expert that still has room, highest plan
  value first (vectorised; at most ``E + 1`` rounds);
- ``solver="auto"``: exact up to ``exact_max_tokens`` tokens per group;
- at inference each token takes its top-1 expert (greedy, as BASE does).

Shapes: logits ``[groups, group_tokens, experts]`` -> expert per token
``[groups, group_tokens]`` (``-1`` when dropped by ``overflow="drop"``).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from ssroute.errors import ConfigError
from ssroute.routing.base import Router, Routing, check_capacity_factor, register_router, sparse_routing
from ssroute.routing.capacity import bucket_positions, expert_capacity
from ssroute.routing.losses import z_loss
from ssroute.routing.ops import gate_logits, softmax_experts
from ssroute.routing.sinkhorn import sinkhorn


def assign_exact(scores: Tensor, capacity: int, lower: int = 0) -> Tensor:
    """Optimal assignment ``[groups, group_tokens]`` maximising the summed scores.

    Each expert has ``capacity`` slots, of which the first ``lower`` must be
    filled (when there are tokens for them): those slots carry a bonus larger
    than any score difference, so the optimum fills them first and is the best
    assignment among those that do.
    """
    groups, n, experts = scores.shape
    values = scores.detach().double().cpu().numpy()
    cost = np.repeat(-values, capacity, axis=2)  # [groups, n, experts*capacity], slot s of expert e at e*capacity + s
    if lower > 0:
        bonus = (values.max() - values.min() + 1.0) * (n + 1)
        mandatory = np.arange(experts * capacity) % capacity < lower
        cost[:, :, mandatory] -= bonus
    assigned = np.full((groups, n), -1, dtype=np.int64)
    for g in range(groups):  # one solver call per image; the solver itself is C
        rows, cols = linear_sum_assignment(cost[g])
        assigned[g, rows] = cols // capacity
    return torch.from_numpy(assigned).to(scores.device)


def assign_sinkhorn(scores: Tensor, capacity: int, num_iters: int = 20, temperature: float = 1.0, lower: int = 0) -> Tensor:
    """Approximate balanced assignment ``[groups, group_tokens]`` from the sinkhorn plan.

    With ``lower > 0`` the greedy rounds first fill ``lower`` slots per expert,
    then the remaining ``capacity - lower``, so loads stay within ``[lower, capacity]``.
    """
    groups, n, experts = scores.shape
    preference = sinkhorn(scores.detach(), num_iters, temperature)
    assigned = torch.full((groups, n), -1, dtype=torch.long, device=scores.device)
    for room_per_expert in ((lower, capacity - lower) if lower > 0 else (capacity,)):
        room = torch.full((groups, experts), room_per_expert, dtype=torch.long, device=scores.device)
        assigned = _greedy_fill(preference, assigned, room)
    return assigned


def _greedy_fill(preference: Tensor, assigned: Tensor, room: Tensor) -> Tensor:
    """Rounds in which every unassigned token takes its best expert with ``room [groups, experts]`` left, best first."""
    groups, n, experts = preference.shape
    group_of = torch.arange(groups, device=preference.device).view(groups, 1).expand(groups, n)
    for _ in range(experts + 1):  # each round fills an expert or places every waiting token
        open_pref = preference.masked_fill((room <= 0).unsqueeze(1), float("-inf"))
        value, choice = open_pref.max(dim=-1)
        value = value.masked_fill(assigned >= 0, float("-inf"))
        order = torch.argsort(value, dim=1, descending=True)
        choice_sorted = torch.gather(choice, 1, order)
        bucket = (group_of * experts + choice_sorted).reshape(-1)
        slot = bucket_positions(bucket, groups * experts).view(groups, n)
        ok = (slot < torch.gather(room, 1, choice_sorted)) & torch.gather(value, 1, order).isfinite()
        placed = torch.full_like(assigned, -1).scatter(1, order, torch.where(ok, choice_sorted, -1))
        assigned = torch.where(assigned >= 0, assigned, placed)
        room = room - torch.bincount((group_of * experts + choice_sorted)[ok], minlength=groups * experts).view(groups, experts)
    return assigned


@register_router("hungarian")
class HungarianRouter(Router):
    """Balanced set matching of tokens to expert slots (BASE layers).

    >>> import torch
    >>> router = HungarianRouter(dim=16, num_experts=4, capacity_factor=1.0)
    >>> router(torch.randn(16, 16), tokens_per_group=8).group_loads().tolist()
    [[2, 2, 2, 2], [2, 2, 2, 2]]

    Args:
        dim: token width.
        num_experts: number of experts ``E``.
        capacity_factor: slots per expert and group are
            ``ceil(capacity_factor * group_tokens / E)``; None = no limit
            (each token simply takes its best expert). At 1 (or below) every
            expert also takes at least ``floor(group_tokens / E)`` tokens, so
            loads differ by at most one.
        overflow: when ``E * capacity < group_tokens``: ``"error"`` (a
            ConfigError) or ``"drop"`` (unmatched tokens pass the residual).
        solver: ``"exact"``, ``"sinkhorn"`` or ``"auto"``.
        exact_max_tokens: largest group ``"auto"`` solves exactly.
        sinkhorn_iters: iterations of the approximate solver.
        temperature: sinkhorn temperature on the logits.
        gate: combine weight: ``"softmax"`` probability or BASE's ``"sigmoid"``
            of the logit.
        z_loss_weight: weight of the router z-loss.
        balanced_inference: keep matching at inference instead of greedy top-1.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        capacity_factor: float | None = 1.0,
        overflow: str = "error",
        solver: str = "auto",
        exact_max_tokens: int = 256,
        sinkhorn_iters: int = 20,
        temperature: float = 1.0,
        gate: str = "softmax",
        z_loss_weight: float = 0.0,
        balanced_inference: bool = False,
    ) -> None:
        super().__init__(dim, num_experts)
        for key, value, allowed in (
            ("overflow", overflow, ("error", "drop")),
            ("solver", solver, ("auto", "exact", "sinkhorn")),
            ("gate", gate, ("softmax", "sigmoid")),
        ):
            if value not in allowed:
                raise ConfigError(f"router hungarian: {key}={value!r} is not valid; choose one of: {', '.join(allowed)}.")
        self.capacity_factor = check_capacity_factor(self.name, capacity_factor)
        self.overflow, self.solver, self.exact_max_tokens = overflow, solver, exact_max_tokens
        self.sinkhorn_iters, self.temperature, self.gate_kind = sinkhorn_iters, temperature, gate
        self.z_loss_weight, self.balanced_inference = z_loss_weight, balanced_inference
        self.gate = nn.Linear(dim, num_experts, bias=False)

    def lower_bound(self, group_tokens: int, capacity: int) -> int:
        """Tokens every expert must take: ``floor(n / E)`` when the capacity is the balanced one (factor <= 1), else 0."""
        return min(capacity, group_tokens // self.num_experts) if self.capacity_factor <= 1.0 else 0

    def capacity(self, group_tokens: int) -> int | None:
        capacity = expert_capacity(self.capacity_factor, 1, group_tokens, self.num_experts)
        if capacity is not None and capacity * self.num_experts < group_tokens and self.overflow == "error":
            raise ConfigError(
                f"router hungarian: capacity_factor={self.capacity_factor} leaves {self.num_experts}*{capacity} slots "
                f"for {group_tokens} tokens per group; raise capacity_factor to at least 1.0 or set overflow='drop'."
            )
        return capacity

    def forward(self, tokens: Tensor, tokens_per_group: int | None = None) -> Routing:
        n = self.group_size(tokens, tokens_per_group)
        logits = gate_logits(self.gate, tokens)
        probs = softmax_experts(logits)
        capacity = self.capacity(n) if self.training or self.balanced_inference else None
        if capacity is not None and capacity < n:
            grouped = logits.detach().view(-1, n, self.num_experts)
            exact = self.solver == "exact" or (self.solver == "auto" and n <= self.exact_max_tokens)
            lower = self.lower_bound(n, capacity)
            if exact:
                assigned = assign_exact(grouped, capacity, lower)
            else:
                assigned = assign_sinkhorn(grouped, capacity, self.sinkhorn_iters, self.temperature, lower)
            assigned = assigned.view(-1)
        else:  # greedy top-1 (inference); with room for every token the matching is greedy anyway
            assigned = logits.detach().argmax(dim=-1)
        token = torch.arange(tokens.shape[0], device=tokens.device)
        kept = assigned >= 0  # all of them unless overflow="drop"
        token, assigned = token[kept], assigned[kept]
        weight = probs[token, assigned] if self.gate_kind == "softmax" else torch.sigmoid(logits[token, assigned])
        aux = self.z_loss_weight * z_loss(logits) if self.z_loss_weight else None
        return sparse_routing(probs, token, assigned, weight, n, aux, capacity)
