"""Hash and random routing are fixed functions of their seed."""

from __future__ import annotations

import torch

from ssroute.routing import build_router


def test_position_hash_is_deterministic_balanced_and_per_image() -> None:
    a = build_router("hash", dim=8, num_experts=4, seed=3)
    b = build_router("hash", dim=8, num_experts=4, seed=3)
    ra, rb = a(torch.randn(5 * 12, 8), 12), b(torch.randn(5 * 12, 8), 12)
    assert torch.equal(ra.expert, rb.expert)
    per_image = ra.expert.view(5, 12)
    assert bool((per_image == per_image[0]).all())
    assert torch.equal(ra.group_loads(), torch.full((5, 4), 3))
    other = build_router("hash", dim=8, num_experts=4, seed=4)(torch.randn(60, 8), 12)
    assert not torch.equal(other.expert, ra.expert)


def test_content_hash_follows_the_token_not_its_position() -> None:
    router = build_router("hash", dim=8, num_experts=4, key="content")
    x = torch.randn(40, 8)
    perm = torch.randperm(40)
    assert torch.equal(router(x[perm]).expert, router(x).expert[perm])
    assert router(x).expert.unique().numel() > 1


def test_random_is_fixed_per_seed() -> None:
    a = build_router("random", dim=8, num_experts=6, k=2, seed=1)
    first, second = a(torch.randn(30, 8)), a(torch.randn(30, 8))
    assert torch.equal(first.expert, second.expert)
    again = build_router("random", dim=8, num_experts=6, k=2, seed=1)(torch.randn(30, 8))
    assert torch.equal(again.expert, first.expert)
    other = build_router("random", dim=8, num_experts=6, k=2, seed=2)(torch.randn(30, 8))
    assert not torch.equal(other.expert, first.expert)
    assert first.experts_per_token().tolist() == [2] * 30
    assert torch.allclose(first.probs, torch.full((30, 6), 1 / 6))


def test_not_learned() -> None:
    for name in ("hash", "random"):
        router = build_router(name, dim=8, num_experts=4)
        assert not router.learned and not list(router.parameters())
