"""Expert selection for upcycled (MoEfied) FFNs: an MLP predicting each expert's activation mass.

MoEfication (Zhang et al. 2022, "MoEfication: Transformer Feed-forward Layers
are Mixtures of Experts") splits a trained dense FFN into experts and picks,
per token, the ``k`` experts whose neurons would be the most active. The
``mlp_selection`` router is that selector: a two-layer MLP ``dim -> hidden ->
experts`` whose scores are trained (``ssroute.upcycle``) to predict each
expert's share of the token's hidden activation mass, then top-k. The first
layer can start from the cluster centroids (:meth:`init_from_centroids`), so
before training the score of expert ``e`` is the activation of its mean neuron.

Selected experts get combine weight exactly **1** (the dense FFN is the sum of
all experts, so k = E reproduces it). With ``straight_through=true`` the weight
is ``1 + g - stop_gradient(g)`` with ``g = sigmoid(score)``: still 1 in value,
but fine-tuning sends gradients to the router as if it gated. ``random=true`` is
MoEfication's random-selection baseline: ``k`` distinct experts per token from a
generator re-seeded every call, weights 1, the MLP unused.

Shapes: tokens ``[tokens, dim]`` -> scores/probs ``[tokens, experts]`` -> pairs ``[tokens * k]``.

>>> import torch
>>> router = MLPSelectionRouter(dim=8, num_experts=4, k=2)
>>> routing = router(torch.randn(6, 8), tokens_per_group=3)
>>> routing.experts_per_token().tolist(), routing.weight.tolist() == [1.0] * 12
([2, 2, 2, 2, 2, 2], True)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ssroute.errors import ConfigError
from ssroute.routing.base import Router, Routing, check_k, register_router, sparse_routing


@register_router("mlp_selection")
class MLPSelectionRouter(Router):
    """Top-k over an MLP's predicted expert activation mass (MoEfication), or random selection.

    Args:
        dim: token width.
        num_experts: number of experts ``E``.
        k: experts per token (settable with :meth:`set_k`).
        hidden: the selector MLP's hidden width; None = ``2 * E``.
        random: select ``k`` random experts per token instead (the baseline).
        seed: seed of the random selection.
        straight_through: let gradients reach the MLP through weights that stay 1.
    """

    maskable_experts = True

    def __init__(
        self,
        dim: int,
        num_experts: int,
        k: int = 1,
        hidden: int | None = None,
        random: bool = False,
        seed: int = 0,
        straight_through: bool = True,
    ) -> None:
        super().__init__(dim, num_experts)
        self.k = check_k(self.name, k, num_experts)
        hidden = 2 * num_experts if hidden is None else int(hidden)
        if hidden < num_experts:
            raise ConfigError(
                f"router mlp_selection: hidden={hidden} must be at least num_experts={num_experts} (the centroids fill the first units)."
            )
        self.random, self.seed, self.straight_through = bool(random), seed, straight_through
        self.learned = not self.random  # the instance attribute shadows the class default
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, num_experts))

    def set_k(self, k: int) -> None:
        self.k = check_k(self.name, k, self.num_experts)

    def experts_per_token(self, tokens_per_group: int) -> float:
        return float(self.k)

    def flops_per_token(self, tokens_per_group: int) -> float:
        if self.random:
            return 0.0
        return 2.0 * (self.dim * self.mlp[0].out_features + self.mlp[0].out_features * self.num_experts)

    @torch.no_grad()
    def init_from_centroids(self, centroids: Tensor, bias: Tensor | None = None) -> None:
        """Start as ``score_e = relu(centroid_e . x + bias_e)``: ``centroids [E, dim]``, ``bias [E]``."""
        experts = self.num_experts
        if centroids.shape != (experts, self.dim):
            raise ConfigError(f"router mlp_selection: centroids must be [{experts}, {self.dim}], got {list(centroids.shape)}.")
        first, second = self.mlp[0], self.mlp[2]
        first.weight[:experts] = centroids.to(first.weight.dtype)
        first.bias[:experts] = 0.0 if bias is None else bias.to(first.bias.dtype)
        second.weight.zero_()
        second.weight[:, :experts] = torch.eye(experts)
        second.bias.zero_()

    def scores(self, tokens: Tensor) -> Tensor:
        """``[tokens, experts]`` predicted activation mass (logits of its share)."""
        scores = self.mlp(tokens)
        return scores if self.expert_logit_offset is None else scores + self.expert_logit_offset

    def forward(self, tokens: Tensor, tokens_per_group: int | None = None) -> Routing:
        n = self.group_size(tokens, tokens_per_group)
        total = tokens.shape[0]
        token = torch.arange(total, device=tokens.device).repeat_interleave(self.k)
        if self.random:
            generator = torch.Generator().manual_seed(self.seed)
            chosen = torch.rand(total, self.num_experts, generator=generator).topk(self.k, dim=-1).indices.to(tokens.device)
            probs = tokens.new_full((total, self.num_experts), 1.0 / self.num_experts)
            return sparse_routing(probs, token, chosen.reshape(-1), tokens.new_ones(total * self.k), n)
        scores = self.scores(tokens)
        probs = torch.softmax(scores.float(), dim=-1).to(tokens.dtype)
        chosen = scores.detach().topk(self.k, dim=-1).indices
        weight = tokens.new_ones(total * self.k)
        if self.straight_through:
            gate = torch.sigmoid(scores.gather(1, chosen)).reshape(-1)
            weight = weight + (gate - gate.detach())  # exactly 0 in value, so weights stay exactly 1
        return sparse_routing(probs, token, chosen.reshape(-1), weight, n)
