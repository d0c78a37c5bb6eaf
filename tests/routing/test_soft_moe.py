"""Soft MoE: slots are convex mixes of tokens, outputs convex mixes of slots."""

from __future__ import annotations

import torch

from ssroute.routing import build_router


def test_dispatch_and_combine_are_normalised() -> None:
    router = build_router("soft_moe", dim=8, num_experts=3, slots_per_expert=2)
    routing = router(torch.randn(4 * 5, 8), tokens_per_group=5)
    assert routing.dispatch_weights.shape == (4, 5, 3, 2)
    assert torch.allclose(routing.dispatch_weights.sum(1), torch.ones(4, 3, 2), atol=1e-5)  # each slot mixes its image's tokens
    assert torch.allclose(routing.combine_weights.sum((2, 3)), torch.ones(4, 5), atol=1e-5)
    assert int(routing.num_dropped) == 0 and torch.equal(routing.load(), torch.full((3,), 4 * 2))


def test_slots_only_mix_tokens_of_their_own_image() -> None:
    router = build_router("soft_moe", dim=8, num_experts=2)
    x = torch.randn(2 * 4, 8)
    a = router(x, 4).dispatch_weights
    x2 = x.clone()
    x2[4:] = torch.randn(4, 8)  # change image 1 only
    assert torch.allclose(router(x2, 4).dispatch_weights[0], a[0])
