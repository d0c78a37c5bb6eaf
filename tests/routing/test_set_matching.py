"""Hungarian set matching: optimal against brute force, balanced, greedy at inference."""

from __future__ import annotations

import itertools

import pytest
import torch

from ssroute.errors import ConfigError
from ssroute.routing import build_router
from ssroute.routing.set_matching import assign_exact, assign_sinkhorn


def _brute_force(scores: torch.Tensor, capacity: int, lower: int = 0) -> float:
    tokens, experts = scores.shape
    best = -float("inf")
    for assignment in itertools.product(range(experts), repeat=tokens):
        if lower <= min(assignment.count(e) for e in range(experts)) and max(assignment.count(e) for e in range(experts)) <= capacity:
            best = max(best, sum(scores[t, e].item() for t, e in enumerate(assignment)))
    return best


@pytest.mark.parametrize(("tokens", "experts", "seed"), [(6, 3, 0), (6, 3, 1), (5, 2, 2), (7, 3, 3), (4, 4, 4)])
def test_router_matching_is_optimal_and_balanced(tokens: int, experts: int, seed: int) -> None:
    torch.manual_seed(seed)
    router = build_router("hungarian", dim=8, num_experts=experts, capacity_factor=1.0, solver="exact")
    x = 3 * torch.randn(2 * tokens, 8)
    routing = router(x, tokens_per_group=tokens)
    capacity = -(-tokens // experts)
    assert routing.capacity == capacity and int(routing.num_dropped) == 0
    assert int(routing.group_loads().max()) <= capacity and int(routing.group_loads().min()) >= tokens // experts
    logits = router.gate(x).detach()
    for g in range(2):
        mine = routing.token // tokens == g
        total = logits[routing.token[mine], routing.expert[mine]].sum().item()
        best = _brute_force(logits[g * tokens : (g + 1) * tokens], capacity, lower=tokens // experts)
        assert total == pytest.approx(best, abs=1e-4)


@pytest.mark.parametrize("solver", ["exact", "sinkhorn"])
@pytest.mark.parametrize(("tokens", "experts"), [(10, 4), (13, 4), (49, 8), (7, 3)])
def test_loads_differ_by_at_most_one_when_experts_do_not_divide_the_tokens(solver: str, tokens: int, experts: int) -> None:
    torch.manual_seed(tokens)
    router = build_router("hungarian", dim=8, num_experts=experts, capacity_factor=1.0, solver=solver)
    x = torch.randn(6 * tokens, 8) + 2.0  # a shared offset: most tokens prefer the same expert
    loads = router(x, tokens_per_group=tokens).group_loads()
    assert int(loads.sum()) == 6 * tokens
    assert bool(((loads.max(dim=1).values - loads.min(dim=1).values) <= 1).all()), loads.tolist()


def test_exactly_balanced_when_tokens_divide() -> None:
    router = build_router("hungarian", dim=8, num_experts=4)
    routing = router(torch.randn(5 * 12, 8) + 2, tokens_per_group=12)
    assert torch.equal(routing.group_loads(), torch.full((5, 4), 3))


def test_sinkhorn_solver_is_balanced_and_near_optimal() -> None:
    torch.manual_seed(0)
    scores = 2 * torch.randn(32, 49, 8)
    capacity = 7
    exact, approx = assign_exact(scores, capacity), assign_sinkhorn(scores, capacity)
    assert bool((approx >= 0).all())
    loads = torch.stack([torch.bincount(row, minlength=8) for row in approx])
    assert int(loads.max()) <= capacity
    value = lambda a: scores.gather(2, a.unsqueeze(-1)).sum().item()
    assert value(approx) <= value(exact) + 1e-3
    assert value(approx) >= value(exact) - 0.05 * abs(value(exact))


def test_auto_uses_approximation_for_large_groups() -> None:
    router = build_router("hungarian", dim=8, num_experts=4, exact_max_tokens=8)
    routing = router(torch.randn(2 * 16, 8), tokens_per_group=16)
    assert torch.equal(routing.group_loads(), torch.full((2, 4), 4))


def test_greedy_top1_at_inference() -> None:
    router = build_router("hungarian", dim=8, num_experts=4).eval()
    x = torch.randn(24, 8) + 2
    routing = router(x, tokens_per_group=12)
    assert torch.equal(routing.expert, router.gate(x).argmax(-1)) and routing.capacity is None


def test_more_tokens_than_slots() -> None:
    router = build_router("hungarian", dim=8, num_experts=4, capacity_factor=0.5)
    with pytest.raises(ConfigError, match="overflow='drop'"):
        router(torch.randn(16, 8), tokens_per_group=16)
    dropping = build_router("hungarian", dim=8, num_experts=4, capacity_factor=0.5, overflow="drop")
    routing = dropping(torch.randn(16, 8), tokens_per_group=16)
    assert int(routing.num_dropped) == 8 and torch.equal(routing.group_loads(), torch.full((1, 4), 2))


def test_bad_solver_name() -> None:
    with pytest.raises(ConfigError, match="solver='hungry'"):
        build_router("hungarian", dim=8, num_experts=4, solver="hungry")
