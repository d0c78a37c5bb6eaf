"""MLP experts with stacked weights: ``E`` feed-forward networks in one module.

The expert FFN of V-MoE (Riquelme et al. 2021) and Switch (Fedus et al. 2021):
each expert is the ViT MLP ``dim -> hidden -> ... -> dim``. Weights are stacked
along a leading expert axis — ``w_in [experts, dim, hidden]``,
``w_mid [depth-2, experts, hidden, hidden]``, ``w_out [experts, hidden, dim]`` —
so one expert's block of expert-sorted rows is a plain ``addmm``, and all
experts run in one grouped call where the device allows
(:mod:`ssroute.experts.grouped`: torch's grouped GEMM on CUDA in bfloat16, one
``bmm`` for equal blocks (expert choice), else a loop over experts — never over tokens).

``out_bias="shared"`` replaces the per-expert output biases by one ``[dim]``
bias shared by all experts and split equally among a token's routed rows
(``bias / rows_of_token`` per row; the whole bias per soft-MoE slot, whose
combine weights sum to 1), so with combine weights 1 a token gets the bias
exactly once whatever its k. Upcycling (``ssroute.upcycle``) uses it
to carry a dense FFN's ``fc2`` bias, so that the experts' sum at k = E is the
dense FFN and fewer experts still add the full bias.

>>> import torch
>>> bank = MLPExperts(dim=8, hidden=16, num_experts=3)
>>> bank(torch.randn(5, 8), [2, 0, 3], None).shape
torch.Size([5, 8])
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ssroute.errors import ConfigError
from ssroute.experts.base import EXPERTS, ExpertBank, ExpertContext
from ssroute.experts.grouped import expert_mlp
from ssroute.layers.mlp import build_activation


@EXPERTS.register("mlp")
class MLPExperts(ExpertBank):
    """``E`` MLP experts.

    Args:
        dim: token width.
        hidden: one expert's hidden width.
        num_experts: number of experts ``E``.
        depth: linear layers per expert (2 = the ViT MLP).
        activation: ``gelu``, ``relu`` or ``silu``.
        out_bias: ``expert`` (one output bias per expert) or ``shared`` (one bias, split
            among a token's rows; see the module docstring).
    """

    def __init__(self, dim: int, hidden: int, num_experts: int, depth: int = 2, activation: str = "gelu", out_bias: str = "expert") -> None:
        super().__init__(dim, hidden, num_experts)
        if depth < 2:
            raise ConfigError(f"experts mlp: depth={depth} must be at least 2; use depth=2 for the ViT MLP.")
        if out_bias not in ("expert", "shared"):
            raise ConfigError(f"experts mlp: out_bias={out_bias!r} is not valid; choose expert or shared.")
        self.out_bias = out_bias
        self.depth = depth
        self.act = build_activation(activation)
        self.w_in, self.b_in = self._stacked(num_experts, dim, hidden)
        mids = [self._stacked(num_experts, hidden, hidden) for _ in range(depth - 2)]
        self.w_mid = nn.Parameter(torch.stack([w for w, _ in mids])) if mids else None
        self.b_mid = nn.Parameter(torch.stack([b for _, b in mids])) if mids else None
        self.w_out, self.b_out = self._stacked(num_experts, hidden, dim)
        if out_bias == "shared":
            self.b_out = nn.Parameter(self.b_out.detach()[0].clone())  # [dim]

    @staticmethod
    def _stacked(experts: int, fan_in: int, fan_out: int) -> tuple[nn.Parameter, nn.Parameter]:
        # nn.Linear's default init per expert, so an expert starts like a dense FFN layer.
        bound = 1.0 / math.sqrt(max(fan_in, 1))  # a pruned expert may keep no hidden units
        weight = torch.empty(experts, fan_in, fan_out).uniform_(-bound, bound)
        bias = torch.empty(experts, fan_out).uniform_(-bound, bound)
        return nn.Parameter(weight), nn.Parameter(bias)

    def shared_params(self) -> int:
        return self.dim if self.out_bias == "shared" else 0

    def flops_per_row(self, tokens_per_image: int) -> float:
        return 2.0 * (2 * self.dim * self.hidden + (self.depth - 2) * self.hidden * self.hidden)

    def forward(self, x: Tensor, sizes: list[int], context: ExpertContext | None) -> Tensor:
        shared = self.out_bias == "shared"
        mids = list(zip(self.w_mid.unbind(0), self.b_mid.unbind(0), strict=True)) if self.w_mid is not None else []
        weights = [self.w_in, *(w for w, _ in mids), self.w_out]
        biases = [self.b_in, *(b for _, b in mids), None if shared else self.b_out]
        y = expert_mlp(x, sizes, weights, biases, self.act)  # the module, so hooks on it (pruning masks) apply
        return y + self._shared_bias(y, context) if shared else y

    def _shared_bias(self, y: Tensor, context: ExpertContext | None) -> Tensor:
        """``[rows, dim]`` share of the shared output bias each row carries."""
        if context is None or context.token_index is None:  # one expert call per row (soft slots): the whole bias
            return self.b_out.expand_as(y)
        token = context.token_index
        counted = None if context.valid is None else context.valid.to(y.dtype)  # empty reference slots are no rows of a token
        rows_of_token = torch.bincount(token, counted, minlength=context.num_images * context.tokens_per_image).index_select(0, token)
        return self.b_out.unsqueeze(0) / rows_of_token.clamp_min(1).unsqueeze(1).to(y.dtype)
