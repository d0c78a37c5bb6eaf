"""Expert choice: every expert is exactly full; sinkhorn variant balances the choice."""

from __future__ import annotations

import math

import pytest
import torch

from ssroute.routing import build_router


@pytest.mark.parametrize("name", ["expert_choice", "sinkhorn_expert_choice"])
@pytest.mark.parametrize(("tokens", "experts", "factor"), [(10, 4, 1.0), (49, 8, 1.0), (7, 3, 2.0), (6, 8, 0.5), (5, 2, None)])
def test_every_expert_gets_exactly_its_capacity(name: str, tokens: int, experts: int, factor: float | None) -> None:
    router = build_router(name, dim=8, num_experts=experts, capacity_factor=factor)
    routing = router(torch.randn(3 * tokens, 8), tokens_per_group=tokens)
    capacity = tokens if factor is None else min(tokens, math.ceil(factor * tokens / experts))
    assert routing.capacity == capacity
    assert torch.equal(routing.group_loads(), torch.full((3, experts), capacity))


def test_experts_pick_their_highest_probability_tokens() -> None:
    router = build_router("expert_choice", dim=8, num_experts=2, capacity_factor=1.0)
    routing = router(torch.randn(6, 8), tokens_per_group=6)
    for e in range(2):
        chosen = set(routing.token[routing.expert == e].tolist())
        assert chosen == set(torch.topk(routing.probs[:, e], 3).indices.tolist())


def test_sinkhorn_expert_choice_drops_fewer_tokens() -> None:
    torch.manual_seed(0)
    x = torch.randn(64 * 16, 8) + 1.5
    soft = build_router("expert_choice", dim=8, num_experts=4)
    sink = build_router("sinkhorn_expert_choice", dim=8, num_experts=4, sinkhorn_iters=30)
    sink.gate.load_state_dict(soft.gate.state_dict())
    assert int(sink(x, 16).num_dropped) < int(soft(x, 16).num_dropped)
