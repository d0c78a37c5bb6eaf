"""The sequential patch selector's halting: ACT over patches, stopping at the threshold, pool weights and ponder cost."""

import math

import pytest
import torch

from ssroute.patches.sequential import SequentialPatches


def constant_halting(probability, epsilon, num=6, dim=8):
    selector = SequentialPatches(patch_size=2, image_size=8, num_patches=num, dim=dim, halt_epsilon=epsilon, ponder_weight=1.0)
    torch.nn.init.zeros_(selector.halt_head[1].weight)
    torch.nn.init.constant_(selector.halt_head[1].bias, math.log(probability / (1 - probability)))
    return selector


@pytest.mark.parametrize("epsilon,taken", [(0.05, 4), (0.15, 3), (0.35, 3), (0.45, 2)])
def test_sequential_halting_stops_at_the_threshold(epsilon, taken):
    selector = constant_halting(0.3, epsilon)  # cumulative halting 0.3, 0.6, 0.9, 1.2 ...
    mask, weights, ponder = selector.halt(torch.randn(2, 6, 8))
    assert mask.sum(dim=1).tolist() == [taken, taken]
    remainder = 1 - 0.3 * (taken - 1)
    act = [0.3] * (taken - 1) + [remainder]
    expected = [sum(a / t for t, a in enumerate(act, start=1) if t >= j) for j in range(1, 7)]
    assert torch.allclose(weights[0], torch.tensor(expected), atol=1e-6)
    assert ponder.item() == pytest.approx((taken + remainder) / 6, abs=1e-6)


def test_sequential_takes_every_patch_when_the_threshold_is_never_reached():
    mask, weights, _ = constant_halting(0.01, 0.01).halt(torch.randn(3, 6, 8))
    assert mask.all() and torch.allclose(weights.sum(dim=1), torch.ones(3))
