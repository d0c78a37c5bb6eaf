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

from dataclasses import dataclass

import torch
from torch import Tensor

from ssroute.errors import ConfigError
from ssroute.routing.base import Router, Routing, check_capacity_factor, check_k, register_router, sparse_routing
from ssroute.routing.capacity import choice_order, expert_capacity, within_capacity
from ssroute.routing.losses import balance_losses
from ssroute.routing.ops import LinearGate, randn_like_experts, softmax_experts, top_experts
from ssroute.routing.sinkhorn import sinkhorn


@dataclass
class Gating:
    """What noisy top-k gating decided, ``[rows, experts]`` / ``[rows, k]``."""

    logits: Tensor  # clean router logits
    noisy: Tensor  # logits plus the training noise (== logits without noise)
    probs: Tensor  # softmax of the clean logits: the router's distribution (importance loss, consistency)
    chosen: Tensor  # [rows, k] experts picked on the noisy scores
    gates: Tensor  # [rows, k] combine weights: the noisy softmax at the chosen experts (normalised if asked)
    priority: Tensor  # [rows] batch priority: the largest raw (unnormalised) noisy gate


def check_normalize(router: str, k: int, normalize_weights: bool) -> None:
    if normalize_weights and k == 1:
        raise ConfigError(
            f"router {router}: normalize_weights=true with k=1 makes every combine weight 1, so the router gets no gradient "
            "from the task; use k >= 2 or normalize_weights=false."
        )


def noisy_top_k(logits: Tensor, k: int, noise_std: float, normalize: bool, selection: Tensor | None = None) -> Gating:
    """V-MoE's noisy top-k gating of ``[rows, experts]`` logits (rows are tokens, or images for image routing).

    Noise (``noise_std > 0``) perturbs the choice and the combine weights, never
    ``probs``: V-MoE computes importance on the clean gates. ``selection``
    overrides the scores the top-k is taken on (sinkhorn token choice).
    """
    noisy = logits + randn_like_experts(logits) * noise_std if noise_std > 0 else logits
    probs = softmax_experts(logits)
    noisy_probs = softmax_experts(noisy) if noise_std > 0 else probs
    with torch.no_grad():
        chosen = top_experts(noisy.detach() if selection is None else selection, k)
    gates = noisy_probs.gather(1, chosen)
    priority = gates.detach().max(dim=-1).values  # V-MoE: the largest raw gate, taken before any normalisation
    if normalize:
        gates = gates / gates.sum(dim=-1, keepdim=True)
    return Gating(logits, noisy, probs, chosen, gates, priority)


class NoisyTopKRouter(Router):
    """What token choice and image routing share: a bias-free linear gate, noisy top-k gating
    (:func:`noisy_top_k`), k, and the weights of the balance and z losses.

    Args:
        dim: token width.
        num_experts: number of experts ``E``.
        k: experts per row (token or image), settable later with :meth:`set_k`.
        noise_std: std of Gaussian noise on the logits in training; None = ``1 / E`` (V-MoE), 0 = off.
        importance_weight, load_weight, z_loss_weight: weights of the importance, load and z losses.
        normalize_weights: rescale each row's kept top-k gates to sum to 1 (needs k >= 2).
        cosine_scale: None = a linear gate; a number = a cosine gate with this scale (:class:`~ssroute.routing.ops.LinearGate`).
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        k: int = 1,
        noise_std: float | None = None,
        importance_weight: float = 0.005,
        load_weight: float = 0.005,
        z_loss_weight: float = 0.0,
        normalize_weights: bool = False,
        cosine_scale: float | None = None,
    ) -> None:
        super().__init__(dim, num_experts)
        self.k = check_k(self.name, k, num_experts)
        self.noise_std = 1.0 / num_experts if noise_std is None else float(noise_std)
        self.importance_weight = importance_weight
        self.load_weight = load_weight
        self.z_loss_weight = z_loss_weight
        self.normalize_weights = normalize_weights
        check_normalize(self.name, self.k, normalize_weights)
        if cosine_scale is not None and cosine_scale <= 0:
            raise ConfigError(f"router {self.name}: cosine_scale={cosine_scale} must be positive (or null for a linear gate).")
        self.gate = LinearGate(dim, num_experts, cosine_scale)

    def set_k(self, k: int) -> None:
        check_normalize(self.name, k, self.normalize_weights)
        self.k = check_k(self.name, k, self.num_experts)

    def experts_per_token(self, tokens_per_group: int) -> float:
        return float(self.k)


@register_router("token_choice")
class TokenChoiceRouter(NoisyTopKRouter):
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
        normalize_weights: rescale each token's kept top-k gates to sum to 1
            (needs k >= 2: with k = 1 every weight would be 1 and the router
            would get no gradient from the task).
        cosine_scale: None = a linear gate; a number = a cosine gate with this
            scale (normalised tokens and expert vectors, SwAV-style prototypes).
    """

    maskable_experts = True

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
        cosine_scale: float | None = None,
    ) -> None:
        super().__init__(dim, num_experts, k, noise_std, importance_weight, load_weight, z_loss_weight, normalize_weights, cosine_scale)
        self.capacity_factor = check_capacity_factor(self.name, capacity_factor)
        self.batch_priority = batch_priority

    def selection_scores(self, logits: Tensor, group_tokens: int) -> Tensor | None:
        """``[tokens, experts]`` scores the top-k is taken on; None = the noisy logits."""
        return None

    def forward(self, tokens: Tensor, tokens_per_group: int | None = None) -> Routing:
        n = self.group_size(tokens, tokens_per_group)
        noise = self.noise_std if self.training else 0.0
        logits = self.gate(tokens)
        if self.expert_logit_offset is not None:
            logits = logits + self.expert_logit_offset
        g = noisy_top_k(logits, self.k, noise, self.normalize_weights, selection=self.selection_scores(logits.detach(), n))
        pair = choice_order(g.chosen, n, g.priority if self.batch_priority else None)
        token = torch.div(pair, self.k, rounding_mode="floor")
        expert = g.chosen.reshape(-1).index_select(0, pair)
        capacity = expert_capacity(self.capacity_factor, self.k, n, self.num_experts)
        if capacity is not None:
            keep = within_capacity(token, expert, n, self.num_experts, capacity).nonzero().squeeze(1)
            pair, token, expert = pair.index_select(0, keep), token.index_select(0, keep), expert.index_select(0, keep)
        weight = g.gates.reshape(-1).index_select(0, pair)
        aux = balance_losses(
            logits,
            g.probs,
            g.chosen,
            group_tokens=n,
            noisy_logits=g.noisy,
            noise_std=noise,
            importance_weight=self.importance_weight,
            load_weight=self.load_weight,
            z_loss_weight=self.z_loss_weight,
        )
        return sparse_routing(g.probs, token, expert, weight, n, aux, capacity)


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

    maskable_experts = False  # the balanced plan spreads tokens over every expert, a masked one too

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
