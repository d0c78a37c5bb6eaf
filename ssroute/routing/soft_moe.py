"""Soft MoE router: every slot is a convex mix of a group's tokens.

Puigcerver et al. 2023, "From Sparse to Soft Mixtures of Experts". Each expert
owns ``slots_per_expert`` slots with learned embeddings ``phi [dim, E*S]``.
Per group (image) with logits ``L = x phi`` ``[group_tokens, E*S]``:

- dispatch = softmax of ``L`` over tokens: slot input ``x̃_s = Σ_n D[n,s] x_n``;
- combine = softmax of ``L`` over slots: ``y_n = Σ_s C[n,s] expert(x̃_s)``.

Both are ``[groups, group_tokens, experts, slots]`` on the :class:`Routing`.
``probs [tokens, experts]`` sums each token's combine weights per expert (rows
sum to 1), and the sparse triples list every (token, expert) pair with that
weight — what analytics and consistency losses read; execution uses the soft
tensors. No token is ever dropped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssroute.errors import ConfigError
from ssroute.routing.base import Router, Routing, register_router


@register_router("soft_moe")
class SoftMoERouter(Router):
    """Soft MoE slots.

    >>> import torch
    >>> router = SoftMoERouter(dim=16, num_experts=4, slots_per_expert=2)
    >>> routing = router(torch.randn(10, 16), tokens_per_group=5)
    >>> routing.dispatch_weights.shape, routing.is_soft
    (torch.Size([2, 5, 4, 2]), True)

    Args:
        dim: token width.
        num_experts: number of experts ``E``.
        slots_per_expert: slots ``S`` per expert and group.
        normalize: L2-normalise tokens and slot embeddings with a learned
            scale (the paper's fix for large ``dim``).
    """

    soft = True

    def __init__(self, dim: int, num_experts: int, slots_per_expert: int = 1, normalize: bool = False) -> None:
        super().__init__(dim, num_experts)
        if slots_per_expert < 1:
            raise ConfigError(f"router soft_moe: slots_per_expert={slots_per_expert} must be at least 1; set a positive slot count.")
        self.slots_per_expert = slots_per_expert
        self.normalize = normalize
        self.slot_embed = nn.Parameter(torch.randn(dim, num_experts * slots_per_expert) * dim**-0.5)
        self.scale = nn.Parameter(torch.ones(())) if normalize else None

    def experts_per_token(self, tokens_per_group: int) -> float:
        return self.num_experts * self.slots_per_expert / tokens_per_group

    def flops_per_token(self, tokens_per_group: int) -> float:
        # logits, then dispatch and combine products over dim, each slots x dim per token
        return 3 * 2.0 * self.dim * self.num_experts * self.slots_per_expert

    def forward(self, tokens: Tensor, tokens_per_group: int | None = None) -> Routing:
        n = self.group_size(tokens, tokens_per_group)
        x = tokens.view(-1, n, self.dim)
        phi = self.slot_embed
        if self.normalize:
            x = F.normalize(x, dim=-1)
            phi = self.scale * F.normalize(phi, dim=0)
        logits = torch.einsum("gnd,ds->gns", x, phi).float()
        shape = (x.shape[0], n, self.num_experts, self.slots_per_expert)
        dispatch = torch.softmax(logits, dim=1).to(tokens.dtype).view(shape)
        combine = torch.softmax(logits, dim=2).to(tokens.dtype).view(shape)
        probs = combine.sum(-1).reshape(-1, self.num_experts)
        total = probs.shape[0]
        token = torch.arange(total, device=tokens.device).repeat_interleave(self.num_experts)
        expert = torch.arange(self.num_experts, device=tokens.device).repeat(total)
        zero = probs.new_zeros(())
        return Routing(
            probs, token, expert, probs.reshape(-1), zero, torch.zeros((), dtype=torch.long, device=tokens.device), n,
            capacity=self.slots_per_expert, dispatch_weights=dispatch, combine_weights=combine,
        )  # fmt: skip
