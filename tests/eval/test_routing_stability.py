import pytest
import torch

from ssroute.eval.routing_stability import RoutingStabilityMeter

B, N, E = 8, 49, 4


def one_hot(indices):
    return torch.nn.functional.one_hot(indices, E).float()


def test_identical_routings_agree_fully():
    experts = torch.randint(0, E, (B, N))
    meter = RoutingStabilityMeter(E)
    partner, valid = torch.arange(N).expand(B, N), torch.ones(B, N, dtype=torch.bool)
    meter.update("blocks.2", one_hot(experts), one_hot(experts), partner, valid, torch.bincount(experts.flatten(), minlength=E))
    assert meter.compute()["block2/routing_agreement"] == 1.0


def test_independent_routings_agree_at_chance():
    g = torch.Generator().manual_seed(0)
    weights = torch.tensor([0.4, 0.3, 0.2, 0.1])
    meter = RoutingStabilityMeter(E)
    partner, valid = torch.arange(N).expand(B, N), torch.ones(B, N, dtype=torch.bool)
    for _ in range(50):
        a = torch.multinomial(weights, B * N, replacement=True, generator=g).view(B, N)
        b = torch.multinomial(weights, B * N, replacement=True, generator=g).view(B, N)
        meter.update("blocks.0", one_hot(a), one_hot(b), partner, valid, torch.bincount(a.flatten(), minlength=E))
    stats = meter.compute()
    assert stats["routing_agreement_chance"] == pytest.approx(float((weights**2).sum()), abs=0.01)
    assert stats["routing_agreement"] == pytest.approx(stats["routing_agreement_chance"], abs=0.01)


def test_partners_and_masks_are_respected_and_dead_experts_counted():
    # view 2 is view 1 shifted by one token; with the right partners agreement is perfect
    experts = torch.randint(0, 2, (1, N))  # experts 2 and 3 never used
    shifted = experts.roll(1, dims=1)
    partner = (torch.arange(N) + 1).clamp(max=N - 1).unsqueeze(0)
    valid = torch.ones(1, N, dtype=torch.bool)
    valid[0, -1] = False  # the last token's partner left the view
    meter = RoutingStabilityMeter(E)
    meter.update("blocks.1", one_hot(experts), one_hot(shifted), partner, valid, torch.bincount(experts.flatten(), minlength=E))
    stats = meter.compute()
    assert stats["routing_agreement"] == 1.0
    assert stats["dead_experts"] == 2.0
    assert 0.0 < stats["expert_usage_entropy"] <= 0.5 + 1e-6  # two of four experts used: at most log 2 / log 4
