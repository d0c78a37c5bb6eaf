import pytest
import torch

from ssroute.errors import ConfigError
from ssroute.objectives.routing_consistency import batch_usage_entropy, routing_consistency_loss, sinkhorn_targets

B, N, E = 4, 16, 4


def identity_match():
    partner = torch.arange(N).expand(B, N)
    return partner, torch.ones(B, N, dtype=torch.bool)


def loss(p1, p2, **kwargs):
    partner, valid = identity_match()
    return float(routing_consistency_loss(p1, p2, partner, valid, partner, valid, **kwargs))


def balanced_routing(confidence=0.9):
    """Token t -> expert t mod E with the given confidence: balanced usage."""
    p = torch.full((B, N, E), (1 - confidence) / (E - 1))
    p[:, torch.arange(N), torch.arange(N) % E] = confidence
    return p


@pytest.mark.parametrize("balance", ["sinkhorn", "entropy", "none"])
def test_loss_is_smallest_when_views_agree_and_grows_with_disagreement(balance):
    p = balanced_routing()
    swapped = p.roll(1, dims=-1)  # every token moves to the next expert in view 2
    values = [loss(p, (1 - a) * p + a * swapped, balance=balance) for a in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert all(b > a for a, b in zip(values, values[1:], strict=False)), values


@pytest.mark.parametrize("balance", ["sinkhorn", "entropy"])
def test_balance_makes_all_to_one_routing_worse_than_balanced_consistent_routing(balance):
    all_to_one = torch.full((B, N, E), 0.02 / (E - 1))
    all_to_one[..., 0] = 0.98
    assert loss(all_to_one, all_to_one, balance=balance) > loss(balanced_routing(), balanced_routing(), balance=balance) + 0.5


def test_without_balance_collapse_looks_fine_which_is_why_balance_exists():
    all_to_one = torch.full((B, N, E), 0.02 / (E - 1))
    all_to_one[..., 0] = 0.98
    assert loss(all_to_one, all_to_one, balance="none") < loss(balanced_routing(), balanced_routing(), balance="none") + 0.05


def test_sinkhorn_targets_have_equal_expert_marginals():
    probs = torch.softmax(torch.randn(64, E) * 3, dim=-1)
    targets = sinkhorn_targets(probs, temperature=0.5, iterations=50)
    assert torch.allclose(targets.sum(dim=1), torch.ones(64), atol=1e-4)
    assert torch.allclose(targets.sum(dim=0), torch.full((E,), 64 / E), atol=1e-3)


def test_sinkhorn_targets_balance_a_router_that_prefers_one_expert():
    # a router that sends ~45% of tokens to expert 0, sharpened at T=0.1: nearly one-hot rows
    logits = torch.randn(4000, 8, generator=torch.Generator().manual_seed(0)) * 3
    logits[:, 0] += 4
    targets = sinkhorn_targets(logits.softmax(-1), temperature=0.1)
    usage = targets.mean(dim=0)
    assert usage.max() < 0.2  # unbalanced targets (the linear-domain version gave 0.43) would teach the collapse
    assert targets.max(dim=1).values.mean() > 0.9  # ... while staying confident


def test_gradients_flow_to_both_views_and_invalid_tokens_are_ignored():
    logits1 = torch.randn(B, N, E, requires_grad=True)
    logits2 = torch.randn(B, N, E, requires_grad=True)
    partner, valid = identity_match()
    valid = valid.clone()
    valid[:, :4] = False
    out = routing_consistency_loss(logits1.softmax(-1), logits2.softmax(-1), partner, valid, partner, valid)
    out.backward()
    assert logits1.grad[:, 4:].abs().sum() > 0 and logits2.grad[:, 4:].abs().sum() > 0
    assert logits1.grad[:, :4].abs().sum() == 0  # masked tokens get no gradient


def test_usage_entropy_is_normalised():
    assert float(batch_usage_entropy(balanced_routing(1.0))) == pytest.approx(1.0)
    one_hot = torch.zeros(B, N, E)
    one_hot[..., 2] = 1
    assert float(batch_usage_entropy(one_hot)) == pytest.approx(0.0, abs=1e-6)


def test_unknown_balance_is_a_clear_error():
    with pytest.raises(ConfigError, match="balance='max' is unknown; choose one of sinkhorn, sinkhorn_position, entropy, none"):
        loss(balanced_routing(), balanced_routing(), balance="max")


def test_position_balanced_targets_leave_position_no_say_in_the_target():
    from ssroute.objectives.routing_consistency import position_sinkhorn_targets, sinkhorn_targets

    torch.manual_seed(0)
    # a router that partitions the grid: position n -> expert n % 4, content ignored
    positions, experts, batch = 8, 4, 32
    probs = torch.full((batch, positions, experts), 0.02)
    probs[:, torch.arange(positions), torch.arange(positions) % experts] = 0.94
    probs = probs + 0.01 * torch.rand_like(probs)  # content: a little per-image variation
    probs = probs / probs.sum(-1, keepdim=True)
    valid = torch.rand(batch, positions) > 0.2
    targets = position_sinkhorn_targets(probs, valid, temperature=0.1)
    assert torch.allclose(targets.sum(-1), torch.ones(batch, positions), atol=1e-5)
    mass = (targets * valid.unsqueeze(-1)).sum(dim=0)  # [positions, experts]
    expected = valid.sum(dim=0, keepdim=True).t().float() / experts
    assert torch.allclose(mass, expected.expand(-1, experts), atol=1e-3)  # every position spread evenly, invalid rows ignored
    balanced = sinkhorn_targets(probs[valid], 0.1)
    per_position = torch.zeros(positions, experts).index_add_(0, valid.nonzero()[:, 1], balanced)
    assert float(per_position.max(dim=1).values.div(per_position.sum(dim=1)).min()) > 0.9  # overall balance keeps the partition
