"""Mask analytics: non-uniformity by hand, Ripley's L sees clusters and regular spacing, per-block sparsity."""

from __future__ import annotations

import math

import torch

from ssroute.prune.analytics import mask_analytics, nonuniformity, ripley_l
from ssroute.prune.masks import MaskSet
from tests.prune.helpers import build


def test_nonuniformity_by_hand() -> None:
    even = nonuniformity([2.0, 2.0, 2.0, 2.0])
    assert (
        even["nonuniformity/entropy"] == 1.0
        and even["nonuniformity/kl_uniform"] == 0.0
        and even["nonuniformity/wasserstein_uniform"] == 0.0
    )
    one = nonuniformity([0.0, 0.0, 5.0, 0.0])
    assert one["nonuniformity/entropy"] == 0.0 and abs(one["nonuniformity/kl_uniform"] - math.log(4)) < 1e-6
    assert abs(one["nonuniformity/wasserstein_uniform"] - (2 + 1 + 0 + 1) / 4) < 1e-9


def test_ripley_l_sees_clusters_and_regular_spacing() -> None:
    width = 64
    clustered = ripley_l(torch.arange(16), width)  # one tight run
    regular = ripley_l(torch.arange(0, 64, 4), width)  # evenly spaced, gaps of 4
    generator = torch.Generator().manual_seed(0)
    random = sum(ripley_l(torch.randperm(width, generator=generator)[:16].sort().values, width) for _ in range(50)) / 50
    assert clustered > 1.0 and regular < -0.5 and abs(random) < 0.5


def test_mask_analytics_per_block_and_structure() -> None:
    torch.manual_seed(0)
    vit, _ = build("token_choice")
    masks = MaskSet(vit).eval()
    with torch.no_grad():
        for gate in masks.gates.values():
            gate.log_alpha.fill_(5.0)
        masks.gates["ffn"].log_alpha.copy_(torch.tensor([5.0, -9.0, 5.0]))
    metrics = mask_analytics(masks.shape, masks.deterministic())
    assert metrics["sparsity/block0/attn"] == 0.0 and metrics["sparsity/block1/attn"] == 0.0
    assert 0.9 < metrics["sparsity/block1/ffn"] < 1.0  # the experts' output biases and the router stay
    assert metrics["kept/ffn"] == round(2 / 3, 6) and metrics["kept/heads"] == 1.0
    assert metrics["nonuniformity/entropy"] < 0.01  # everything removed sits in one block
