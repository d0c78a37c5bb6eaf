"""Token choice routers: each token picks its top-k experts.

- ``token_choice``: softmax top-k of V-MoE (Riquelme et al. 2021, "Scaling
  Vision with Sparse Mixture of Experts"): optional noisy gating, expert
  capacity with **batch priority routing** (BPR: within each image, tokens
  with the largest top-1 gate claim buffer slots first), importance and load
  losses, and the ST-MoE router z-loss.
- ``sinkhorn_token_choice``: the experts are chosen on the sinkhorn-balanced
  plan (Clark et al. 2022) while the combine weights stay the softmax
  probabilities, as in the unified formulation of Liu et al. (arXiv 2401.15969).

Shapes: tokens ``[tokens, dim]`` -> logits/probs ``[tokens, experts]`` -> kept
pairs ``[pairs]``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ssroute.routing.base import Router, Routing, check_capacity_factor, check_k, register_router, sparse_routing
from ssroute.routing.capacity import choice_order, expert_capacity, within_capacity
from ssroute.routing.losses import balance_losses
from ssroute.routing.ops import gate_logits, randn_like_experts, softmax_experts, top_experts
from ssroute.routing.sinkhorn import sinkhorn


@register_router("token_choice")
class TokenChoiceRouter(Router):
    """Softmax top-k token choice with capacity (V-MoE).

    >>> import torch
    >>> router = TokenChoiceRouter(dim=16, num_experts=4, k=2, capacity_factor=1.0)
    >>> routing = router(torch.randn(10, 16), tokens_per_group=5)
    >>> routing.probs.shape, int(routing.group_loads().max()) <= routing.capacity
    (torch.Size([10, 4]), True)

    Args:
        dim: token width.
        num_experts: number of experts ``E``.
        k: experts per token (settable later with :meth:`set_k`).
        capacity_factor: buffer rows per expert are
            ``ceil(capacity_factor * k * group_tokens / E)``; None = no limit.
        batch_priority: BPR — fill buffers in order of the tokens' top-1 gate
            instead of their position, so the most confident tokens are kept.
        noise_std: std of Gaussian noise added to the logits in training;
            None = ``1 / E`` (V-MoE), 0 = off.
        importance_weight: weight of the importance loss.
        load_weight: weight of the load loss (noisy V-MoE form, or Switch form
            without noise).
        z_loss_weight: weight of the router z-loss.
        normalize_weights: rescale each token's kept top-k gates to sum to 1.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        k: int = 1,
        capacity_factor: float | None = 1.25,
        batch_priority: bool = False,
        noise_std: float | None = None,
        importance_weight: float = 0.005,
        load_weight: float = 0.005,
        z_loss_weight: float = 0.0,
        normalize_weights: bool = False,
    ) -> None:
        super().__init__(dim, num_experts)
        self.k = check_k(self.name, k, num_experts)
        self.capacity_factor = check_capacity_factor(self.name, capacity_factor)
        self.batch_priority = batch_priority
        self.noise_std = 1.0 / num_experts if noise_std is None else float(noise_std)
        self.importance_weight = importance_weight
        self.load_weight = load_weight
        self.z_loss_weight = z_loss_weight
        self.normalize_weights = normalize_weights
        self.gate = nn.Linear(dim, num_experts, bias=False)

    def set_k(self, k: int) -> None:
        self.k = check_k(self.name, k, self.num_experts)

    def experts_per_token(self, tokens_per_group: int) -> float:
        return float(self.k)

    def selection_scores(self, logits: Tensor, group_tokens: int) -> Tensor:
        """``[tokens, experts]`` scores the top-k is taken on (the logits here)."""
        return logits

    def forward(self, tokens: Tensor, tokens_per_group: int | None = None) -> Routing:
        n = self.group_size(tokens, tokens_per_group)
        logits = gate_logits(self.gate, tokens)
        noisy = logits
        if self.training and self.noise_std > 0:
            noisy = logits + randn_like_experts(logits) * self.noise_std
        probs = softmax_experts(noisy)
        with torch.no_grad():
            chosen = top_experts(self.selection_scores(noisy.detach(), n), self.k)
        gates = probs.gather(1, chosen)
        if self.normalize_weights:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        priority = gates[:, 0].detach() if self.batch_priority else None
        pair = choice_order(chosen, n, priority)
        token = torch.div(pair, self.k, rounding_mode="floor")
        expert = chosen.reshape(-1).index_select(0, pair)
        capacity = expert_capacity(self.capacity_factor, self.k, n, self.num_experts)
        if capacity is not None:
            keep = within_capacity(token, expert, n, self.num_experts, capacity).nonzero().squeeze(1)
            pair, token, expert = pair.index_select(0, keep), token.index_select(0, keep), expert.index_select(0, keep)
        weight = gates.reshape(-1).index_select(0, pair)
        aux = balance_losses(
            logits,
            probs,
            chosen,
            noisy_logits=noisy,
            noise_std=self.noise_std if self.training else 0.0,
            importance_weight=self.importance_weight,
            load_weight=self.load_weight,
            z_loss_weight=self.z_loss_weight,
        )
        return sparse_routing(probs, token, expert, weight, n, aux, capacity)


@register_router("sinkhorn_token_choice")
class SinkhornTokenChoiceRouter(TokenChoiceRouter):
    """Token choice on the sinkhorn-balanced plan; softmax combine weights.

    >>> import torch
    >>> router = SinkhornTokenChoiceRouter(dim=16, num_experts=4)
    >>> router(torch.randn(8, 16), tokens_per_group=4).token.shape[0] <= 8
    True

    Args:
        dim, num_experts, k, capacity_factor, batch_priority, noise_std,
        importance_weight, load_weight, z_loss_weight, normalize_weights: as
            for :class:`TokenChoiceRouter`; the balance losses default to 0
            because sinkhorn balances the choice itself.
        sinkhorn_iters: sinkhorn normalisation steps per group.
        temperature: sinkhorn temperature on the logits.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        k: int = 1,
        capacity_factor: float | None = 1.25,
        batch_priority: bool = False,
        noise_std: float | None = 0.0,
        importance_weight: float = 0.0,
        load_weight: float = 0.0,
        z_loss_weight: float = 0.0,
        normalize_weights: bool = False,
        sinkhorn_iters: int = 10,
        temperature: float = 1.0,
    ) -> None:
        super().__init__(
            dim, num_experts, k, capacity_factor, batch_priority, noise_std,
            importance_weight, load_weight, z_loss_weight, normalize_weights,
        )  # fmt: skip
        self.sinkhorn_iters = sinkhorn_iters
        self.temperature = temperature

    def selection_scores(self, logits: Tensor, group_tokens: int) -> Tensor:
        grouped = logits.view(-1, group_tokens, self.num_experts)
        plan = sinkhorn(grouped, self.sinkhorn_iters, self.temperature)
        return plan.view(-1, self.num_experts)
