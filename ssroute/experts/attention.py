"""Attention experts: self-attention among the tokens of one image routed to the same expert.

The research notes ask why experts are always MLPs. Here expert ``e`` is a
multi-head self-attention layer (Vaswani et al. 2017) whose context is the set
of rows routed to ``e`` *from the same image*: an expert specialises in a kind
of patch and lets those patches exchange information, a sparse counterpart of
the block's dense attention. Rows of different images never attend to each
other; for Soft MoE the rows are slots and ``context.slot_image`` says whose.
Rows that hold no token (``context.valid`` False: the empty capacity slots of
the dense reference) are never attended to.

Execution is batched over experts and images, with no loop at all: rows are
scattered into a padded ``[experts * images, slots, dim]`` tensor (``slots`` =
the most rows any (expert, image) cell got; one host sync), projected with
stacked weights by one batched matmul per projection, attended with
``scaled_dot_product_attention`` under a key-padding mask, and gathered back.
``hidden`` is the attention width (query/key/value), split over ``heads``.

>>> import torch
>>> bank = AttentionExperts(dim=8, hidden=16, num_experts=2, heads=2)
>>> from ssroute.experts.base import ExpertContext
>>> bank(torch.randn(5, 8), [2, 3], ExpertContext(torch.tensor([0, 4, 1, 2, 5]), 3, 2)).shape
torch.Size([5, 8])
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssroute.errors import ConfigError
from ssroute.experts.base import EXPERTS, ExpertBank, ExpertContext


@EXPERTS.register("attention")
class AttentionExperts(ExpertBank):
    """``E`` multi-head self-attention experts, each within one image's routed rows.

    Args:
        dim: token width.
        hidden: attention width (query/key/value size), divisible by ``heads``.
        num_experts: number of experts ``E``.
        heads: attention heads per expert.
    """

    def __init__(self, dim: int, hidden: int, num_experts: int, heads: int = 4) -> None:
        super().__init__(dim, hidden, num_experts)
        if heads < 1 or hidden % heads:
            raise ConfigError(
                f"experts attention: heads={heads} must divide the expert hidden width {hidden}; choose a divisor of {hidden}."
            )
        self.heads = heads
        bound_in, bound_out = 1.0 / math.sqrt(dim), 1.0 / math.sqrt(hidden)
        self.w_qkv = nn.Parameter(torch.empty(num_experts, dim, 3 * hidden).uniform_(-bound_in, bound_in))
        self.b_qkv = nn.Parameter(torch.zeros(num_experts, 1, 3 * hidden))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden, dim).uniform_(-bound_out, bound_out))
        self.b_out = nn.Parameter(torch.zeros(num_experts, 1, dim))

    def flops_per_row(self, tokens_per_image: int) -> float:
        # projections, plus scores and values over at most tokens_per_image / E rows of the same image on average
        context_rows = max(1.0, tokens_per_image / self.num_experts)
        return 2.0 * 4 * self.dim * self.hidden + 4.0 * context_rows * self.hidden

    def forward(self, x: Tensor, sizes: list[int], context: ExpertContext) -> Tensor:
        rows = x.shape[0]
        if rows == 0:
            return x
        if context is None:
            raise ConfigError("experts attention needs an ExpertContext (which image each row is from); run it inside an MoE layer.")
        experts, images = self.num_experts, context.num_images
        expert = torch.repeat_interleave(torch.arange(experts, device=x.device), torch.tensor(sizes, device=x.device))
        cell = expert * images + context.image_index  # [rows] (expert, image) cell of each row
        order = torch.argsort(cell, stable=True)
        counts = torch.bincount(cell, minlength=experts * images)
        slots = int(counts.max())  # the padded width: one host sync
        start = torch.cumsum(counts, 0) - counts
        sorted_cell = cell.index_select(0, order)
        position = torch.arange(rows, device=x.device) - start.index_select(0, sorted_cell)
        padded = x.new_zeros(experts * images, slots, self.dim).index_put((sorted_cell, position), x.index_select(0, order))
        is_token = torch.ones_like(position, dtype=torch.bool) if context.valid is None else context.valid.index_select(0, order)
        valid = torch.zeros(experts * images, slots, dtype=torch.bool, device=x.device).index_put((sorted_cell, position), is_token)
        valid = valid | ~valid.any(-1, keepdim=True)  # empty cells: attend to padding rather than produce NaN (discarded)
        qkv = torch.baddbmm(self.b_qkv, padded.view(experts, images * slots, self.dim), self.w_qkv)
        head = self.hidden // self.heads
        q, k, v = qkv.view(experts * images, slots, 3, self.heads, head).permute(2, 0, 3, 1, 4)  # each [cells, heads, slots, head]
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])
        attended = attended.transpose(1, 2).reshape(experts, images * slots, self.hidden)
        out = torch.baddbmm(self.b_out, attended, self.w_out).view(experts * images, slots, self.dim)
        y = out[sorted_cell, position]  # [rows, dim] in cell order
        return torch.empty_like(y).index_copy(0, order, y)
