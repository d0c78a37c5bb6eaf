"""Dispatch and combine (ssroute/moe/dispatch.py): the gather-only path for one expert per token is exact, gradients included."""

from __future__ import annotations

import pytest
import torch

from ssroute.moe import build_moe
from ssroute.moe.dispatch import combine, dispatch, plan_dispatch


def _reference(flat, token, expert, weight, num_experts, transform):
    """The plain sort-gather-scatter of the MoE layer, on autograd."""
    order = torch.argsort(expert, stable=True)
    rows = flat.index_select(0, token[order])
    y = transform(rows) * weight[order].unsqueeze(1)
    return torch.zeros_like(flat).index_add(0, token[order], y)


@pytest.mark.parametrize(
    ("token", "expert", "unique"),
    [
        ([3, 0, 5, 1, 4], [1, 0, 2, 1, 0], True),  # one expert per token, token 2 dropped
        ([0, 1, 2, 3, 4, 5], [2, 2, 0, 1, 0, 2], True),  # a permutation, nothing dropped
        ([0, 0, 1, 3, 3, 5], [0, 2, 1, 0, 1, 2], False),  # tokens with two experts (top-2, expert choice)
    ],
)
def test_dispatch_and_combine_match_the_scatter_reference(token, expert, unique) -> None:
    torch.manual_seed(0)
    token, expert = torch.tensor(token), torch.tensor(expert)
    flat = torch.randn(6, 4, requires_grad=True)
    weight = torch.rand(token.numel(), requires_grad=True)
    scale = torch.randn(4)
    transform = lambda rows: rows * scale + rows.square()  # noqa: E731 - a row-wise stand-in for the experts
    upstream = torch.randn(6, 4)

    def run(fn):
        flat.grad, weight.grad = None, None
        out = fn()
        (out * upstream).sum().backward()
        return out.detach(), flat.grad.clone(), weight.grad.clone()

    plan = plan_dispatch(token, expert, num_tokens=6, num_experts=3)
    assert plan.unique is unique
    assert plan.sizes == torch.bincount(expert, minlength=3).tolist()
    got = run(lambda: combine(transform(dispatch(flat, plan)), weight, plan, 6))
    expected = run(lambda: _reference(flat, token, expert, weight, 3, transform))
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)
    dropped = torch.bincount(token, minlength=6) == 0
    assert bool((got[0][dropped] == 0).all()) and bool((got[1][dropped] == 0).all())  # no output, no gradient


@pytest.mark.parametrize(("router", "options"), [("token_choice", {}), ("vq", {}), ("token_choice", {"k": 2}), ("expert_choice", {})])
def test_layer_gradients_equal_the_scatter_execution(router: str, options: dict) -> None:
    torch.manual_seed(0)
    moe = build_moe(dim=8, hidden=16, num_experts=4, router=router, **options).eval()
    x = torch.randn(3, 10, 8, requires_grad=True)
    y, routing = moe.forward_with_routing(x)
    upstream = torch.randn_like(y)
    grads = torch.autograd.grad((y * upstream).sum(), [x, moe.experts.w_in], retain_graph=True)  # the routing weights are reused below
    flat = x.reshape(-1, 8)

    def experts(rows):
        order = torch.argsort(routing.expert, stable=True)
        sizes = torch.bincount(routing.expert, minlength=4).tolist()
        bank = moe.experts
        out, start = [], 0
        for e, size in enumerate(sizes):  # rows arrive expert-sorted
            out.append(bank.act(rows[start : start + size] @ bank.w_in[e] + bank.b_in[e]) @ bank.w_out[e] + bank.b_out[e])
            start += size
        return torch.cat(out) if order.numel() else rows

    expected = _reference(flat, routing.token, routing.expert, routing.weight, 4, experts).view_as(y)
    torch.testing.assert_close(y, expected)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), [x, moe.experts.w_in])
    for a, b in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b)
