"""Dynamic-k routers: each token decides how many experts it uses.

- ``top_p``: Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic
  Routing in MoE Models" — a token keeps its most probable experts until their
  cumulative probability reaches ``p`` (so at least one), with an entropy
  ("dynamic") loss that lets confident tokens use fewer experts.
- ``threshold``: a token keeps every expert whose score passes a threshold —
  the softmax probability (``score="softmax"``, default threshold ``1/E``:
  experts above uniform, always at least the top-1) or the ReLU gate of ReMoE
  (Wang et al. 2024, "ReMoE: Fully Differentiable Mixture-of-Experts with ReLU
  Routing"; ``score="relu"``, default threshold 0, weights are the gates and an
  L1 penalty sets the sparsity; a token may use zero experts).

``max_k`` caps the experts per token (the k a schedule sets via ``set_k``).
Optional capacity fills buffers first choices first, as token choice does.
Shapes: probs ``[tokens, experts]``; kept mask ``[tokens, experts]`` -> pairs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ssroute.errors import ConfigError
from ssroute.routing.base import Router, Routing, check_capacity_factor, check_k, register_router, sparse_routing
from ssroute.routing.capacity import choice_order, expert_capacity, within_capacity
from ssroute.routing.losses import balance_losses, entropy_loss
from ssroute.routing.ops import gate_logits, softmax_experts


class DynamicKRouter(Router):
    """Shared machinery: score, keep a per-token set of experts, apply caps.

    Args:
        dim: token width.
        num_experts: number of experts ``E``.
        max_k: most experts per token; None = ``E``.
        capacity_factor: optional capacity (``ceil(cf * max_k * n / E)``); None = no limit.
        importance_weight, load_weight, z_loss_weight: balance losses as for token choice.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        max_k: int | None = None,
        capacity_factor: float | None = None,
        importance_weight: float = 0.0,
        load_weight: float = 0.01,
        z_loss_weight: float = 0.0,
    ) -> None:
        super().__init__(dim, num_experts)
        self.k = check_k(self.name, num_experts if max_k is None else max_k, num_experts, key="max_k")
        self.capacity_factor = check_capacity_factor(self.name, capacity_factor)
        self.importance_weight, self.load_weight, self.z_loss_weight = importance_weight, load_weight, z_loss_weight
        self.gate = nn.Linear(dim, num_experts, bias=False)

    def set_k(self, k: int) -> None:
        self.k = check_k(self.name, k, self.num_experts, key="max_k")

    def experts_per_token(self, tokens_per_group: int) -> float | None:
        return None  # data-dependent: the MoE layer measures it

    def keep_sorted(self, logits: Tensor, sorted_probs: Tensor, sorted_logits: Tensor) -> Tensor:
        """``[tokens, experts]`` bool over experts sorted by probability (descending)."""
        raise NotImplementedError

    def gates(self, logits: Tensor, probs: Tensor) -> Tensor:
        """``[tokens, experts]`` combine weights of kept experts."""
        return probs

    def extra_loss(self, logits: Tensor, probs: Tensor) -> Tensor | float:
        return 0.0

    def forward(self, tokens: Tensor, tokens_per_group: int | None = None) -> Routing:
        n = self.group_size(tokens, tokens_per_group)
        logits = gate_logits(self.gate, tokens)
        probs = softmax_experts(logits)
        with torch.no_grad():
            sorted_probs, ranked = torch.sort(probs, dim=-1, descending=True)
            keep = self.keep_sorted(logits, sorted_probs, logits.gather(1, ranked))
            keep[:, self.k :] = False
        pair = choice_order(ranked, n)  # first choices of a group first, then second choices, ...
        pair = pair[keep.reshape(-1).index_select(0, pair)]
        token = torch.div(pair, self.num_experts, rounding_mode="floor")
        expert = ranked.reshape(-1).index_select(0, pair)
        capacity = expert_capacity(self.capacity_factor, self.k, n, self.num_experts)
        if capacity is not None:
            fits = within_capacity(token, expert, n, self.num_experts, capacity)
            token, expert = token[fits], expert[fits]
        weight = self.gates(logits, probs)[token, expert]
        aux = balance_losses(
            logits, probs, ranked[:, :1], group_tokens=n, importance_weight=self.importance_weight,
            load_weight=self.load_weight, z_loss_weight=self.z_loss_weight,
        ) + self.extra_loss(logits, probs)  # fmt: skip
        return sparse_routing(probs, token, expert, weight, n, aux, capacity)


@register_router("top_p")
class TopPRouter(DynamicKRouter):
    """Top-p routing: the fewest experts whose probabilities reach ``p``.

    >>> import torch
    >>> router = TopPRouter(dim=16, num_experts=8, p=0.5)
    >>> k = router(3 * torch.randn(64, 16)).experts_per_token()
    >>> bool(k.min() >= 1), bool(k.max() <= 8)
    (True, True)

    Args:
        dim, num_experts, max_k, capacity_factor, importance_weight,
        load_weight, z_loss_weight: as for :class:`DynamicKRouter`.
        p: cumulative-probability threshold in ``(0, 1]``.
        entropy_weight: weight of the dynamic (entropy) loss.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        p: float = 0.4,
        max_k: int | None = None,
        capacity_factor: float | None = None,
        entropy_weight: float = 1e-4,
        importance_weight: float = 0.0,
        load_weight: float = 0.01,
        z_loss_weight: float = 0.0,
    ) -> None:
        super().__init__(dim, num_experts, max_k, capacity_factor, importance_weight, load_weight, z_loss_weight)
        if not 0 < p <= 1:
            raise ConfigError(f"router top_p: p={p} must be in (0, 1]; pick a cumulative probability such as 0.4.")
        self.p, self.entropy_weight = p, entropy_weight

    def keep_sorted(self, logits: Tensor, sorted_probs: Tensor, sorted_logits: Tensor) -> Tensor:
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        return mass_before < self.p

    def extra_loss(self, logits: Tensor, probs: Tensor) -> Tensor | float:
        return self.entropy_weight * entropy_loss(probs) if self.entropy_weight else 0.0


@register_router("threshold")
class ThresholdRouter(DynamicKRouter):
    """Threshold routing on softmax probabilities or ReLU gates (ReMoE).

    >>> import torch
    >>> router = ThresholdRouter(dim=16, num_experts=8, score="relu")
    >>> routing = router(torch.randn(32, 16))
    >>> bool((routing.weight > 0).all())
    True

    Args:
        dim, num_experts, max_k, capacity_factor, importance_weight,
        load_weight, z_loss_weight: as for :class:`DynamicKRouter`.
        score: ``"softmax"`` or ``"relu"``.
        threshold: keep experts scoring above it; None = ``1/E`` (softmax) or 0 (relu).
        l1_weight: ReLU only, L1 penalty on the gates (sparsity).
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        score: str = "softmax",
        threshold: float | None = None,
        max_k: int | None = None,
        capacity_factor: float | None = None,
        l1_weight: float = 1e-3,
        importance_weight: float = 0.0,
        load_weight: float = 0.01,
        z_loss_weight: float = 0.0,
    ) -> None:
        super().__init__(dim, num_experts, max_k, capacity_factor, importance_weight, load_weight, z_loss_weight)
        if score not in ("softmax", "relu"):
            raise ConfigError(f"router threshold: score={score!r} is not valid; choose one of: softmax, relu.")
        self.score = score
        self.threshold = threshold if threshold is not None else (1.0 / num_experts if score == "softmax" else 0.0)
        self.l1_weight = l1_weight

    def keep_sorted(self, logits: Tensor, sorted_probs: Tensor, sorted_logits: Tensor) -> Tensor:
        if self.score == "relu":
            return sorted_logits > self.threshold
        keep = sorted_probs > self.threshold
        keep[:, 0] = True
        return keep

    def gates(self, logits: Tensor, probs: Tensor) -> Tensor:
        return torch.relu(logits) if self.score == "relu" else probs

    def extra_loss(self, logits: Tensor, probs: Tensor) -> Tensor | float:
        if self.score != "relu" or not self.l1_weight:
            return 0.0
        return self.l1_weight * torch.relu(logits).sum(dim=-1).mean()
