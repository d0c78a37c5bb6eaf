"""Per-block probes: one forward pass gives every block, one metric pair per block."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssroute.eval.probes import block_probes, stacked_features
from ssroute.models.vit import ViT


def test_stacked_features_are_the_backbone_features_then_each_normalised_block():
    torch.manual_seed(0)
    vit = ViT(image_size=8, channels=1, dim=16, depth=3, heads=2, patch_size=2).eval()
    images = torch.randn(5, 1, 8, 8)
    stacked = stacked_features(vit, images)
    assert stacked.shape == (5, 4, 16)
    with torch.no_grad():
        torch.testing.assert_close(stacked[:, 0], vit(images)[0])
        for i, out in enumerate(vit(images, keep_blocks=True)[1].block_tokens):
            torch.testing.assert_close(stacked[:, 1 + i], F.layer_norm(out, (16,)).mean(dim=1))


def test_one_knn_and_one_linear_entry_per_block_and_they_see_which_block_separates():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat(30)
    noise = torch.randn(120, 3, 8, generator=g)
    features = noise.clone()
    features[:, 2] += 6 * torch.eye(8)[labels]  # only the last block carries the class
    train, test = slice(0, 80), slice(80, 120)
    metrics = block_probes(features[train], labels[train], features[test], labels[test], k=5)
    assert sorted(metrics) == [f"block{i}/{p}" for i in range(3) for p in ("knn_top1", "linear_top1")]
    assert metrics["block2/knn_top1"] == 1.0 and metrics["block2/linear_top1"] == 1.0
    assert metrics["block0/knn_top1"] < 0.6 and metrics["block1/linear_top1"] < 0.6  # chance is 0.25


def test_knn_only():
    g = torch.Generator().manual_seed(1)
    features, labels = torch.randn(40, 2, 4, generator=g), torch.arange(2).repeat(20)
    assert sorted(block_probes(features, labels, features, labels, k=3, linear=False)) == ["block0/knn_top1", "block1/knn_top1"]
