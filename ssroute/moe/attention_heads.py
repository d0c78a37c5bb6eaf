"""Attention heads as experts: a mixture of attention heads routed per token (MoA, Zhang et al. 2022, arXiv 2210.05144).

``E`` attention heads, each with its own query and output projections, share one
key and value projection; a router (``ssroute.routing``) picks ``k`` heads per
token, and the layer executes the :class:`~ssroute.routing.Routing` on the same
sort-and-gather path as the FFN experts (:class:`~ssroute.moe.MoELayer`): the
(token, head) pairs are sorted by head, each head computes the queries of its
contiguous block of tokens and attends over the keys and values of each token's
own image, and the weighted outputs are scattered back with ``index_add``. No
loop runs over tokens; one runs over heads. The output bias is shared and added once.

With ``kind="relu"`` (:func:`~ssroute.layers.attention.attention_weights`:
ReLU divided by the number of keys, Wortsman et al. 2023) a head's weights
need no softmax over keys, which is what lets the notes' "replace softmax with
relu in attn ... partition into experts" train.

Shapes: ``[batch, tokens, dim] -> ([batch, tokens, dim], Routing of batch * tokens tokens)``.

>>> import torch
>>> moa = build_attention_heads(dim=16, heads=4, k=2, head_dim=8)
>>> y, routing = moa.forward_with_routing(torch.randn(3, 5, 16))
>>> y.shape, routing.experts_per_token().tolist()[:3], moa.accounting(5)["params_active"] < moa.accounting(5)["params_total"]
(torch.Size([3, 5, 16]), [2, 2, 2], True)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ssroute.layers.attention import attention_weights, check_attention
from ssroute.routing import Router, Routing, build_router


class MixtureOfAttentionHeads(nn.Module):
    """``E`` routed attention heads with shared keys and values.

    Args:
        dim: token width.
        router: a router over ``E`` heads (its ``k`` is the heads per token).
        head_dim: width of one head.
        kind: ``softmax`` or ``relu`` attention.
        dropout: dropout on the attention weights.
    """

    def __init__(self, dim: int, router: Router, head_dim: int, kind: str = "softmax", dropout: float = 0.0) -> None:
        super().__init__()
        heads = router.num_experts
        self.dim, self.heads, self.head_dim, self.kind, self.dropout = dim, heads, head_dim, check_attention(kind), dropout
        self.router = router
        self.kv = nn.Linear(dim, 2 * head_dim)
        bound = 1.0 / math.sqrt(dim)
        self.w_q = nn.Parameter(torch.empty(heads, dim, head_dim).uniform_(-bound, bound))
        self.b_q = nn.Parameter(torch.zeros(heads, head_dim))
        self.w_o = nn.Parameter(torch.empty(heads, head_dim, dim).uniform_(-1.0 / math.sqrt(head_dim), 1.0 / math.sqrt(head_dim)))
        self.b_o = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.forward_with_routing(x, mask)[0]

    def forward_with_routing(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Routing]:
        """``x [batch, tokens, dim]``, ``mask [batch, tokens]`` (False = padding no query attends to)."""
        batch, tokens, dim = x.shape
        flat = x.reshape(batch * tokens, dim)
        routing = self.router(flat, tokens_per_group=tokens)
        keys, values = self.kv(x).chunk(2, dim=-1)  # [batch, tokens, head_dim] each, shared by the heads
        order = torch.argsort(routing.expert, stable=True)
        token = routing.token.index_select(0, order)
        sizes = torch.bincount(routing.expert, minlength=self.heads).tolist()
        outputs = []
        for head, (rows, image) in enumerate(
            zip(flat.index_select(0, token).split(sizes), torch.div(token, tokens, rounding_mode="floor").split(sizes), strict=True)
        ):
            if rows.shape[0] == 0:
                outputs.append(rows.new_zeros(0, dim))
                continue
            query = torch.addmm(self.b_q[head], rows, self.w_q[head])  # [n, head_dim]
            k, v = keys.index_select(0, image), values.index_select(0, image)  # [n, tokens, head_dim]: the row's own image
            scores = torch.einsum("nd,nmd->nm", query, k) / math.sqrt(self.head_dim)
            weights = attention_weights(scores.unsqueeze(1), None if mask is None else mask.index_select(0, image), self.kind).squeeze(1)
            weights = nn.functional.dropout(weights, self.dropout, self.training)
            outputs.append(torch.einsum("nm,nmd->nd", weights, v) @ self.w_o[head])
        y = torch.cat(outputs) * routing.weight.index_select(0, order).unsqueeze(1).to(x.dtype)
        out = y.new_zeros(batch * tokens, dim).index_add_(0, token, y) + self.b_o
        return out.view(batch, tokens, dim), routing

    def rows_per_token(self, tokens_per_image: int) -> float:
        nominal = self.router.experts_per_token(tokens_per_image)
        return float(nominal if nominal is not None else getattr(self.router, "k", 1))

    def accounting(self, tokens_per_image: int, measured_rows: float | None = None) -> dict[str, float]:
        """Parameters and per-token FLOPs, as :meth:`ssroute.moe.MoELayer.accounting`: the heads are the experts."""
        rows = measured_rows if measured_rows is not None else self.rows_per_token(tokens_per_image)
        router = sum(p.numel() for p in self.router.parameters())
        per_head = self.w_q[0].numel() + self.b_q[0].numel() + self.w_o[0].numel()
        shared = self.kv.weight.numel() + self.kv.bias.numel() + self.b_o.numel()
        head_flops = 2.0 * (2 * self.dim * self.head_dim) + 4.0 * tokens_per_image * self.head_dim  # q and o projections, scores and values
        expert_flops = rows * head_flops
        return {
            "params_total": float(router + shared + self.heads * per_head),
            "params_active": float(router + shared + min(float(self.heads), rows) * per_head),
            "params_experts": float(self.heads * per_head),
            "flops_per_token": self.router.flops_per_token(tokens_per_image) + 2.0 * self.dim * 2 * self.head_dim + expert_flops,
            "flops_experts_per_token": expert_flops,
        }


def build_attention_heads(
    dim: int, heads: int = 8, k: int = 2, head_dim: int = 16, kind: str = "softmax", dropout: float = 0.0
) -> MixtureOfAttentionHeads:
    """A mixture of ``heads`` attention heads, ``k`` per token, behind a V-MoE token-choice router without capacity."""
    router = build_router("token_choice", dim=dim, num_experts=heads, k=k, capacity_factor=None)
    return MixtureOfAttentionHeads(dim, router, head_dim, kind, dropout)
