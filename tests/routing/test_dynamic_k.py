"""Dynamic k (top-p, threshold, ReLU) and k schedules."""

from __future__ import annotations

import pytest
import torch

from ssroute.errors import ConfigError
from ssroute.moe import build_moe
from ssroute.routing import build_k_schedule, build_router
from ssroute.routing.ops import gate_logits


@pytest.mark.parametrize(("name", "options"), [("top_p", {"p": 0.5}), ("threshold", {}), ("threshold", {"score": "relu"})])
def test_tokens_get_different_k(name: str, options: dict) -> None:
    torch.manual_seed(0)
    router = build_router(name, dim=16, num_experts=8, **options)
    k = router(2 * torch.randn(200, 16)).experts_per_token()
    assert k.unique().numel() > 1


def test_top_p_keeps_smallest_prefix_reaching_p() -> None:
    router = build_router("top_p", dim=16, num_experts=8, p=0.6)
    routing = router(2 * torch.randn(50, 16))
    for t in range(50):
        kept = routing.expert[routing.token == t]
        sorted_probs = routing.probs[t].sort(descending=True).values
        k = kept.numel()
        assert sorted_probs[: k - 1].sum() < 0.6 <= sorted_probs[:k].sum() + 1e-6
        assert set(kept.tolist()) == set(routing.probs[t].argsort(descending=True)[:k].tolist())


def test_max_k_caps_and_set_k_changes_the_cap() -> None:
    router = build_router("top_p", dim=16, num_experts=8, p=1.0, max_k=3)
    assert int(router(torch.randn(30, 16)).experts_per_token().max()) == 3
    router.set_k(5)
    assert int(router(torch.randn(30, 16)).experts_per_token().max()) == 5
    with pytest.raises(ConfigError, match="max_k=9"):
        router.set_k(9)


def test_relu_router_may_skip_tokens_and_weights_are_gates() -> None:
    router = build_router("threshold", dim=16, num_experts=4, score="relu")
    x = torch.randn(64, 16)
    routing = router(x)
    gates = torch.relu(gate_logits(router.gate, x))
    assert torch.allclose(routing.weight, gates[routing.token, routing.expert])
    assert int(routing.num_dropped) == int((gates.sum(-1) == 0).sum())


def test_k_schedules() -> None:
    assert [build_k_schedule("constant", k=2)(s) for s in (0, 100)] == [2, 2]
    linear = build_k_schedule("linear", start=1, end=4, steps=3)
    assert [linear(s) for s in (0, 1, 2, 3, 10)] == [1, 2, 3, 4, 4]
    rand = build_k_schedule("random", low=1, high=3, seed=5)
    draws = [rand(s) for s in range(50)]
    assert set(draws) == {1, 2, 3} and draws == [rand(s) for s in range(50)]
    with pytest.raises(ConfigError, match="k schedule 'linear'"):
        build_k_schedule("linear", start=1)
    with pytest.raises(ConfigError, match="high=1 is below low=2"):
        build_k_schedule("random", low=2, high=1)


def test_schedule_drives_layer_k() -> None:
    moe = build_moe(dim=8, hidden=16, num_experts=4, router="token_choice", capacity_factor=None)
    schedule = build_k_schedule("linear", start=1, end=3, steps=2)
    for step, expected in [(0, 1), (1, 2), (2, 3)]:
        moe.set_k(schedule(step))
        _, routing = moe.forward_with_routing(torch.randn(2, 5, 8))
        assert routing.token.numel() == 10 * expected
    with pytest.raises(ConfigError, match="no k"):
        build_moe(dim=8, hidden=16, num_experts=4, router="expert_choice").set_k(2)
