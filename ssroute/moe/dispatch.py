"""Dispatch and combine of a sparse routing: tokens to expert-sorted rows and back.

The MoE layer sorts the kept (token, expert) pairs by expert, gathers the
tokens into contiguous per-expert blocks, runs the experts and brings the
weighted rows back to their tokens. How they come back depends on the routing:

- **at most one expert per token** (top-1 token choice, VQ, hashing, set
  matching, ...): dispatch and combine are a permutation of rows (plus zero rows
  for dropped tokens), so both directions are gathers, forward and backward
  (:class:`_TakeRows`): no ``[tokens, dim]`` zero-fill and no ``index_add``
  scatter anywhere in the step;
- **several experts per token** (top-k with k > 1, expert choice, dynamic k):
  the rows of one token are summed with ``index_add`` (Switch / V-MoE's combine).

Which case holds is read off the routing (one host read of the largest
per-token count, taken with the per-expert block sizes the experts need anyway).

>>> import torch
>>> plan = plan_dispatch(torch.tensor([2, 0, 1]), torch.tensor([1, 0, 1]), num_tokens=4, num_experts=2)
>>> plan.sizes, plan.row_token.tolist(), plan.unique
([1, 2], [0, 2, 1], True)
>>> x = torch.arange(4.0).unsqueeze(1)
>>> combine(dispatch(x, plan), torch.ones(3), plan, 4).squeeze(1).tolist()  # token 3 was dropped
[0.0, 1.0, 2.0, 0.0]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class DispatchPlan:
    """Where each kept pair goes: expert-sorted rows.

    Attributes:
        row_token: ``[rows]`` the token of each expert-sorted row.
        row_pair: ``[rows]`` the pair (index into the routing's ``token``/``expert``/``weight``) of each row.
        sizes: rows per expert (host ints).
        unique: every token has at most one row (dispatch and combine are row permutations).
        position: unique only, ``[tokens]`` each token's row (any row for dropped tokens).
        dropped: unique only, ``[dropped]`` tokens with no row.
    """

    row_token: Tensor
    row_pair: Tensor
    sizes: list[int]
    unique: bool
    position: Tensor | None = None
    dropped: Tensor | None = None


def plan_dispatch(token: Tensor, expert: Tensor, num_tokens: int, num_experts: int) -> DispatchPlan:
    """Sort the pairs ``(token, expert)`` by expert and decide how rows come back (see the module docstring)."""
    order = torch.argsort(expert, stable=True)
    sorted_token = token.index_select(0, order)
    per_token = torch.bincount(token, minlength=num_tokens)
    most = per_token.max().view(1) if token.numel() else per_token.new_zeros(1)
    *sizes, most = torch.cat([torch.bincount(expert, minlength=num_experts), most]).tolist()  # one host read
    plan = DispatchPlan(sorted_token, order, sizes, unique=0 < most <= 1)
    if plan.unique:
        rows = torch.arange(sorted_token.numel(), device=token.device)
        plan.position = torch.zeros(num_tokens, dtype=torch.long, device=token.device).scatter_(0, sorted_token, rows)
        plan.dropped = (per_token == 0).nonzero().squeeze(1)
    return plan


def dispatch(flat: Tensor, plan: DispatchPlan) -> Tensor:
    """``[tokens, dim] -> [rows, dim]``: the expert-sorted rows."""
    if plan.unique:
        return _TakeRows.apply(flat, plan.row_token, None, plan.position, plan.dropped)
    return flat.index_select(0, plan.row_token)


def combine(y: Tensor, weight: Tensor, plan: DispatchPlan, num_tokens: int) -> Tensor:
    """``[rows, dim]`` expert outputs, ``[pairs]`` combine weights (pair order) -> ``[tokens, dim]`` (0 for dropped tokens)."""
    row_weight = weight.index_select(0, plan.row_pair).to(y.dtype)
    if plan.unique:
        token_weight = row_weight.index_select(0, plan.position)
        if plan.dropped.numel():
            token_weight = token_weight.index_fill(0, plan.dropped, 0.0)
        return _TakeRows.apply(y, plan.position, plan.dropped, plan.row_token, None) * token_weight.unsqueeze(1)
    # y's dtype, not flat's: under autocast the experts compute in bfloat16. In place:
    # the out-of-place index_add would copy the zeros once more.
    return y.new_zeros(num_tokens, y.shape[1]).index_add_(0, plan.row_token, y * row_weight.unsqueeze(1))


class _TakeRows(torch.autograd.Function):
    """``x[index]`` with the rows ``zero`` set to 0, whose gradient is ``grad[back]`` with the rows ``back_zero`` set to 0.

    For a permutation of rows (``index`` and ``back`` inverse to each other on
    the rows that exist) this is exact, and both directions are gathers.
    """

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor, zero: Tensor | None, back: Tensor, back_zero: Tensor | None) -> Tensor:
        ctx.save_for_backward(back, back_zero)
        ctx.has_back_zero = back_zero is not None
        out = x.index_select(0, index)
        return out.index_fill_(0, zero, 0.0) if zero is not None and zero.numel() else out

    @staticmethod
    def backward(ctx, grad: Tensor):
        back, back_zero = ctx.saved_tensors
        out = grad.index_select(0, back)
        if ctx.has_back_zero and back_zero.numel():
            out.index_fill_(0, back_zero, 0.0)
        return out, None, None, None, None


__all__ = ["DispatchPlan", "combine", "dispatch", "plan_dispatch"]
