"""Expert choice routers: each expert picks its top-``capacity`` tokens.

- ``expert_choice``: softmax expert choice (Zhou et al. 2022, "Mixture-of-Experts
  with Expert Choice Routing"): per group, expert ``e`` takes the
  ``capacity = ceil(capacity_factor * group_tokens / E)`` tokens with the
  largest ``probs[:, e]``. Every expert is exactly full; a token may get zero,
  one or several experts.
- ``sinkhorn_expert_choice``: the experts choose on the sinkhorn-balanced plan,
  the combine weights stay the softmax probabilities (Liu et al. 2024, arXiv
  2401.15969, the router introduced there).

Shapes: probs ``[tokens, experts]``; per group the choice is
``topk([groups, experts, group_tokens], capacity)``; pairs ``[groups*E*capacity]``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ssroute.routing.base import Router, Routing, check_capacity_factor, register_router, sparse_routing
from ssroute.routing.capacity import expert_capacity
from ssroute.routing.losses import z_loss
from ssroute.routing.ops import gate_logits, softmax_experts
from ssroute.routing.sinkhorn import sinkhorn


@register_router("expert_choice")
class ExpertChoiceRouter(Router):
    """Softmax expert choice.

    >>> import torch
    >>> router = ExpertChoiceRouter(dim=16, num_experts=4, capacity_factor=1.0)
    >>> router(torch.randn(12, 16), tokens_per_group=6).group_loads().tolist()
    [[2, 2, 2, 2], [2, 2, 2, 2]]

    Args:
        dim: token width.
        num_experts: number of experts ``E``.
        capacity_factor: average experts per token; each expert takes
            ``ceil(capacity_factor * group_tokens / E)`` tokens per group
            (at most all of them). None = every expert takes every token.
        z_loss_weight: weight of the router z-loss.
    """

    def __init__(self, dim: int, num_experts: int, capacity_factor: float | None = 1.0, z_loss_weight: float = 0.0) -> None:
        super().__init__(dim, num_experts)
        self.capacity_factor = check_capacity_factor(self.name, capacity_factor)
        self.z_loss_weight = z_loss_weight
        self.gate = nn.Linear(dim, num_experts, bias=False)

    def capacity(self, group_tokens: int) -> int:
        capacity = expert_capacity(self.capacity_factor, 1, group_tokens, self.num_experts)
        return group_tokens if capacity is None else min(capacity, group_tokens)

    def experts_per_token(self, tokens_per_group: int) -> float:
        return self.num_experts * self.capacity(tokens_per_group) / tokens_per_group

    def selection_scores(self, logits: Tensor, probs: Tensor, group_tokens: int) -> Tensor:
        """``[groups, group_tokens, experts]`` scores each expert ranks tokens by."""
        return probs.detach().view(-1, group_tokens, self.num_experts)

    def forward(self, tokens: Tensor, tokens_per_group: int | None = None) -> Routing:
        n = self.group_size(tokens, tokens_per_group)
        logits = gate_logits(self.gate, tokens)
        probs = softmax_experts(logits)
        capacity = self.capacity(n)
        scores = self.selection_scores(logits, probs, n)
        chosen = torch.topk(scores.transpose(1, 2), capacity, dim=-1).indices  # [groups, experts, capacity]
        groups = chosen.shape[0]
        offset = torch.arange(groups, device=tokens.device).view(groups, 1, 1) * n
        token = (chosen + offset).reshape(-1)
        expert = torch.arange(self.num_experts, device=tokens.device).view(1, -1, 1).expand_as(chosen).reshape(-1)
        weight = probs[token, expert]
        aux = self.z_loss_weight * z_loss(logits) if self.z_loss_weight else None
        return sparse_routing(probs, token, expert, weight, n, aux, capacity)


@register_router("sinkhorn_expert_choice")
class SinkhornExpertChoiceRouter(ExpertChoiceRouter):
    """Expert choice on the sinkhorn-balanced plan; softmax combine weights.

    >>> import torch
    >>> router = SinkhornExpertChoiceRouter(dim=16, num_experts=4)
    >>> router(torch.randn(8, 16), tokens_per_group=8).load().tolist()
    [2, 2, 2, 2]

    Args:
        dim, num_experts, capacity_factor, z_loss_weight: as for
            :class:`ExpertChoiceRouter`.
        sinkhorn_iters: sinkhorn normalisation steps per group.
        temperature: sinkhorn temperature on the logits.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        capacity_factor: float | None = 1.0,
        z_loss_weight: float = 0.0,
        sinkhorn_iters: int = 10,
        temperature: float = 1.0,
    ) -> None:
        super().__init__(dim, num_experts, capacity_factor, z_loss_weight)
        self.sinkhorn_iters = sinkhorn_iters
        self.temperature = temperature

    def selection_scores(self, logits: Tensor, probs: Tensor, group_tokens: int) -> Tensor:
        grouped = logits.detach().view(-1, group_tokens, self.num_experts)
        return sinkhorn(grouped, self.sinkhorn_iters, self.temperature)
