"""Routing agreement on the executed experts: identical routings agree, independent ones at chance, random routing honestly."""

import pytest
import torch

from ssroute.eval.agreement import RoutingAgreementMeter
from ssroute.routing import build_router
from ssroute.routing.base import sparse_routing

B, N, E = 8, 49, 4


def routed(experts: torch.Tensor, probs: torch.Tensor | None = None, keep: torch.Tensor | None = None):
    """A top-1 routing of ``experts [B, N]`` (tokens where ``keep`` is False dropped); ``probs`` default one-hot."""
    flat = experts.reshape(-1)
    probs = torch.nn.functional.one_hot(flat, E).float() if probs is None else probs
    token = torch.arange(flat.numel()) if keep is None else keep.reshape(-1).nonzero().squeeze(1)
    return sparse_routing(probs, token, flat[token], torch.ones(token.numel()), tokens_per_group=experts.shape[1])


def everyone(batch=B, n=N):
    return torch.arange(n).expand(batch, n), torch.ones(batch, n, dtype=torch.bool)


def test_identical_routings_agree_fully():
    experts = torch.randint(0, E, (B, N))
    meter = RoutingAgreementMeter(E)
    meter.update(2, routed(experts), routed(experts), *everyone())
    stats = meter.compute()
    assert stats["block2/routing_agreement"] == 1.0 and stats["block2/routing_js"] == 0.0 and stats["routing_dropped_pairs"] == 0.0


def test_independent_routings_agree_at_chance():
    g = torch.Generator().manual_seed(0)
    weights = torch.tensor([0.4, 0.3, 0.2, 0.1])
    meter = RoutingAgreementMeter(E)
    for _ in range(50):
        a = torch.multinomial(weights, B * N, replacement=True, generator=g).view(B, N)
        b = torch.multinomial(weights, B * N, replacement=True, generator=g).view(B, N)
        meter.update(0, routed(a), routed(b), *everyone())
    stats = meter.compute()
    assert stats["routing_agreement_chance"] == pytest.approx(float((weights**2).sum()), abs=0.01)
    assert stats["routing_agreement"] == pytest.approx(stats["routing_agreement_chance"], abs=0.01)


def test_partners_and_masks_are_respected_and_dead_experts_counted():
    # view 2 is view 1 shifted by one token; with the right partners agreement is perfect
    experts = torch.randint(0, 2, (1, N))  # experts 2 and 3 never used
    shifted = experts.roll(-1, dims=1)
    partner = (torch.arange(N) - 1).clamp(min=0).unsqueeze(0)
    valid = torch.ones(1, N, dtype=torch.bool)
    valid[0, 0] = False  # the first token's partner left the view
    meter = RoutingAgreementMeter(E)
    meter.update(1, routed(experts), routed(shifted), partner, valid)
    stats = meter.compute()
    assert stats["routing_agreement"] == 1.0
    assert stats["dead_experts"] == 2.0
    assert 0.0 < stats["expert_usage_entropy"] <= 0.5 + 1e-6  # two of four experts used: at most log 2 / log 4


def test_agreement_counts_the_executed_experts_not_the_router_preference():
    # the same preference (probs) in both views, but other experts executed: argmax(probs) would claim 1.0
    experts = torch.randint(0, E, (B, N))
    uniform = torch.full((B * N, E), 1.0 / E)
    meter = RoutingAgreementMeter(E)
    meter.update(0, routed(experts, uniform), routed((experts + 1) % E, uniform), *everyone())
    stats = meter.compute()
    assert stats["routing_agreement"] == 0.0 and stats["routing_js"] == 1.0


def test_random_routing_agrees_at_chance():
    # random routing draws the same experts for the same positions: partners one position away agree by chance only
    router = build_router("random", dim=8, num_experts=E)
    x = torch.randn(B * N, 8)
    partner = ((torch.arange(N) + 1) % N).expand(B, N)
    meter = RoutingAgreementMeter(E)
    meter.update(0, router(x, N), router(x, N), partner, torch.ones(B, N, dtype=torch.bool))
    stats = meter.compute()
    assert stats["routing_agreement"] == pytest.approx(1 / E, abs=0.05) and stats["routing_agreement_chance"] == pytest.approx(1 / E, abs=0.02)


def test_a_token_dropped_in_one_view_disagrees_and_in_both_agrees():
    experts = torch.randint(0, E, (B, N))
    keep = torch.rand(B, N, generator=torch.Generator().manual_seed(0)) > 0.25
    meter = RoutingAgreementMeter(E)
    meter.update(0, routed(experts, keep=keep), routed(experts), *everyone())
    stats = meter.compute()
    dropped = 1 - float(keep.float().mean())
    assert stats["routing_dropped_pairs"] == pytest.approx(dropped) and stats["routing_agreement"] == pytest.approx(1 - dropped)
    assert stats["routing_js"] == 0.0  # over pairs both executed
    both = RoutingAgreementMeter(E)
    both.update(0, routed(experts, keep=keep), routed(experts, keep=keep), *everyone())
    assert both.compute()["routing_agreement"] == 1.0 and both.compute()["routing_dropped_pairs"] == pytest.approx(dropped)
