"""Image-level routing consistency: both views of an image are partners."""

from __future__ import annotations

import pytest
import torch

from ssroute.objectives.routing_consistency import image_routing_consistency_loss

B, E = 8, 4


def balanced(confidence: float = 0.9) -> torch.Tensor:
    """Image b -> expert b mod E with the given confidence: balanced usage over the batch."""
    p = torch.full((B, E), (1 - confidence) / (E - 1))
    p[torch.arange(B), torch.arange(B) % E] = confidence
    return p


@pytest.mark.parametrize("balance", ["sinkhorn", "entropy", "none"])
def test_minimal_for_identical_routings_and_growing_with_disagreement(balance: str) -> None:
    p = balanced()
    other = p.roll(1, dims=-1)
    values = [float(image_routing_consistency_loss(p, (1 - a) * p + a * other, balance=balance)) for a in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert all(b > a for a, b in zip(values, values[1:], strict=False)), values


@pytest.mark.parametrize("balance", ["sinkhorn", "entropy"])
def test_balance_penalises_sending_every_image_to_one_expert(balance: str) -> None:
    all_to_one = torch.full((B, E), 0.02 / (E - 1))
    all_to_one[:, 0] = 0.98
    collapsed = float(image_routing_consistency_loss(all_to_one, all_to_one, balance=balance))
    assert collapsed > float(image_routing_consistency_loss(balanced(), balanced(), balance=balance)) + 0.5
    # without balance the collapse looks as good as a balanced consistent routing
    assert float(image_routing_consistency_loss(all_to_one, all_to_one, balance="none")) < 0.2


def test_equals_a_hand_computed_swapped_prediction_to_balanced_targets() -> None:
    g = torch.Generator().manual_seed(0)
    p1, p2 = torch.softmax(torch.randn(B, E, generator=g), -1), torch.softmax(torch.randn(B, E, generator=g), -1)
    # balanced targets by hand: sharpened distributions, rows and columns scaled in turn (linear domain, float64)
    # until every expert takes B / E of the images, as SwAV's equipartition asks
    def balanced(p: torch.Tensor) -> torch.Tensor:
        q = p.double() ** (1 / 0.2)
        for _ in range(2000):
            q = q / q.sum(0, keepdim=True) * (B / E)
            q = q / q.sum(1, keepdim=True)
        return q.float()

    expected = 0.5 * (-(balanced(p2) * p1.log()).sum(-1).mean() - (balanced(p1) * p2.log()).sum(-1).mean())
    assert torch.allclose(image_routing_consistency_loss(p1, p2, temperature=0.2), expected, atol=1e-4)
    # hand-computed with balance=none: mean over images and both directions of -sum(sharpen(partner) * log(own))
    sharpen = lambda p: torch.softmax(torch.log(p) / 0.2, -1)  # noqa: E731
    by_hand = 0.5 * (-(sharpen(p2) * p1.log()).sum(-1).mean() - (sharpen(p1) * p2.log()).sum(-1).mean())
    assert torch.allclose(image_routing_consistency_loss(p1, p2, temperature=0.2, balance="none"), by_hand, atol=1e-5)


def test_gradients_reach_both_views() -> None:
    logits1, logits2 = torch.randn(B, E, requires_grad=True), torch.randn(B, E, requires_grad=True)
    image_routing_consistency_loss(logits1.softmax(-1), logits2.softmax(-1)).backward()
    assert logits1.grad.abs().sum() > 0 and logits2.grad.abs().sum() > 0
