"""Mutual information between the experts of corresponding patches (IIC)."""

import math

import pytest
import torch

from ssroute.objectives.routing_mutual_information import mutual_information_loss, symmetric_mutual_information_loss


def one_hot(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(experts, num_experts).float()


def test_balanced_consistent_routing_reaches_minus_log_experts():
    experts = torch.arange(40) % 4
    valid = torch.ones(40, dtype=torch.bool)
    assert mutual_information_loss(one_hot(experts, 4), one_hot(experts, 4), valid).item() == pytest.approx(-math.log(4), abs=1e-5)


def test_collapsed_or_content_blind_routing_scores_zero():
    valid = torch.ones(40, dtype=torch.bool)
    collapsed = one_hot(torch.zeros(40, dtype=torch.long), 4)
    assert mutual_information_loss(collapsed, collapsed, valid).item() == pytest.approx(0.0, abs=1e-5)
    uniform = torch.full((40, 4), 0.25)
    assert mutual_information_loss(uniform, uniform, valid).item() == pytest.approx(0.0, abs=1e-6)
    a, b = torch.arange(64) % 4, (torch.arange(64) // 4) % 4  # every pair of experts equally often: independent
    assert mutual_information_loss(one_hot(a, 4), one_hot(b, 4), torch.ones(64, dtype=torch.bool)).item() == pytest.approx(0.0, abs=1e-5)


def test_only_valid_pairs_count_and_both_views_get_gradients():
    torch.manual_seed(0)
    logits1, logits2 = torch.randn(2, 6, 3, requires_grad=True), torch.randn(2, 6, 3, requires_grad=True)
    valid = torch.zeros(2, 6, dtype=torch.bool)
    valid[:, :4] = True
    p1, p2 = logits1.softmax(-1), logits2.softmax(-1)
    loss = symmetric_mutual_information_loss(p1, p2, valid, p2, p1, valid)
    loss.backward()
    assert logits1.grad[:, :4].abs().sum() > 0 and logits2.grad[:, :4].abs().sum() > 0
    assert logits1.grad[:, 4:].abs().sum() == 0 and logits2.grad[:, 4:].abs().sum() == 0


def test_minimising_it_makes_routing_consistent_and_balanced():
    torch.manual_seed(0)
    tokens = torch.randn(256, 8)
    pairs = tokens + 0.1 * torch.randn_like(tokens)  # the same patches, slightly changed
    gate = torch.nn.Linear(8, 4, bias=False)
    optimiser = torch.optim.Adam(gate.parameters(), lr=0.05)
    valid = torch.ones(256, dtype=torch.bool)
    for _ in range(200):
        optimiser.zero_grad()
        loss = mutual_information_loss(gate(tokens).softmax(-1), gate(pairs).softmax(-1), valid)
        loss.backward()
        optimiser.step()
    chosen, partner = gate(tokens).argmax(-1), gate(pairs).argmax(-1)
    assert (chosen == partner).float().mean() > 0.9
    assert torch.bincount(chosen, minlength=4).min() > 256 / 4 / 2  # no expert starved
