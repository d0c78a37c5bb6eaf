"""Property tests over shapes, experts, k and capacity factors (hypothesis)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssroute.moe import build_moe, dense_reference
from ssroute.routing.capacity import bucket_positions

FAST = settings(max_examples=25, deadline=None)
factors = st.one_of(st.none(), st.sampled_from([0.25, 0.5, 1.0, 1.5, 3.0]))


def _check(moe, groups: int, tokens: int, dim: int) -> None:
    x = torch.randn(groups * tokens, dim)
    routing = moe.router(x, tokens_per_group=tokens)
    assert torch.allclose(routing.probs.sum(-1), torch.ones(groups * tokens), atol=1e-5)
    assert bool((routing.weight >= 0).all() and torch.isfinite(routing.weight).all())
    if routing.capacity is not None and not routing.is_soft:
        assert int(routing.group_loads().max()) <= routing.capacity
    assert torch.allclose(moe.execute(x, routing), dense_reference(moe.experts, x, routing), atol=1e-5)


@FAST
@given(groups=st.integers(1, 4), tokens=st.integers(1, 12), experts=st.integers(1, 6), data=st.data())
def test_token_choice(groups: int, tokens: int, experts: int, data) -> None:
    k = data.draw(st.integers(1, experts))
    options = {"k": k, "capacity_factor": data.draw(factors), "batch_priority": data.draw(st.booleans())}
    name = data.draw(st.sampled_from(["token_choice", "sinkhorn_token_choice"]))
    _check(build_moe(dim=6, hidden=8, num_experts=experts, router=name, **options), groups, tokens, 6)


@FAST
@given(groups=st.integers(1, 4), tokens=st.integers(1, 12), experts=st.integers(1, 6), factor=factors, data=st.data())
def test_expert_choice_fills_every_expert(groups: int, tokens: int, experts: int, factor, data) -> None:
    name = data.draw(st.sampled_from(["expert_choice", "sinkhorn_expert_choice"]))
    moe = build_moe(dim=6, hidden=8, num_experts=experts, router=name, capacity_factor=factor)
    _check(moe, groups, tokens, 6)
    routing = moe.router(torch.randn(groups * tokens, 6), tokens)
    assert bool((routing.group_loads() == routing.capacity).all())


@FAST
@given(groups=st.integers(1, 3), tokens=st.integers(1, 10), experts=st.integers(1, 5), factor=st.sampled_from([1.0, 1.5, None]))
def test_hungarian_places_every_token_within_capacity(groups: int, tokens: int, experts: int, factor) -> None:
    for solver in ("exact", "sinkhorn"):
        moe = build_moe(dim=6, hidden=8, num_experts=experts, router="hungarian", capacity_factor=factor, solver=solver)
        _check(moe, groups, tokens, 6)
        assert int(moe.router(torch.randn(groups * tokens, 6), tokens).num_dropped) == 0


@FAST
@given(groups=st.integers(1, 3), tokens=st.integers(1, 10), experts=st.integers(1, 6), data=st.data())
def test_dynamic_and_other_routers(groups: int, tokens: int, experts: int, data) -> None:
    name = data.draw(st.sampled_from(["top_p", "threshold", "vq", "hash", "random", "soft_moe", "image"]))
    options = {
        "top_p": {"p": data.draw(st.floats(0.05, 1.0)), "max_k": data.draw(st.integers(1, experts)), "capacity_factor": data.draw(factors)},
        "threshold": {"score": data.draw(st.sampled_from(["softmax", "relu"]))},
        "vq": {"codes_per_expert": data.draw(st.integers(1, 3)), "capacity_factor": data.draw(factors)},
        "hash": {"key": data.draw(st.sampled_from(["position", "content"]))},
        "random": {"k": data.draw(st.integers(1, experts))},
        "soft_moe": {"slots_per_expert": data.draw(st.integers(1, 3))},
        "image": {"k": data.draw(st.integers(1, experts))},
    }[name]
    _check(build_moe(dim=6, hidden=8, num_experts=experts, router=name, **options), groups, tokens, 6)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 5), max_size=40))
def test_bucket_positions_match_a_counter(buckets: list[int]) -> None:
    seen: dict[int, int] = {}
    expected = []
    for b in buckets:
        expected.append(seen.get(b, 0))
        seen[b] = seen.get(b, 0) + 1
    assert bucket_positions(torch.tensor(buckets, dtype=torch.long), 6).tolist() == expected
