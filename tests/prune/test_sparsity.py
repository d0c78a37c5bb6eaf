"""Sparsity counts real parameters: a hand count, numel after removal, and the expected count is the mean count."""

from __future__ import annotations

import torch

from ssroute.models.vit import ViT
from ssroute.prune.masks import MaskSet
from ssroute.prune.shapes import describe
from ssroute.prune.sparsity import expected_sparsity, param_count
from tests.prune.helpers import build, prune_and_rebuild


def test_hand_count_of_a_tiny_vit() -> None:
    vit = ViT(image_size=4, channels=1, dim=4, depth=1, heads=2, patch_size=2, mlp_ratio=2.0)
    shape = describe(vit)
    # patch 4*1*2*2 + 4 = 20, final norm 8; block: norm1 8, qkv 12*4 + 12 = 60, proj 4*4 + 4 = 20, norm2 8, fc1 8*4 + 8 = 40, fc2 4*8 + 4 = 36
    assert float(param_count(shape, {})["total"]) == 20 + 8 + 8 + 60 + 20 + 8 + 40 + 36 == sum(p.numel() for p in vit.parameters())
    keep = {
        "heads_0": torch.tensor([0.0, 1.0]),
        "units_0": torch.tensor([1.0, 1, 1, 1, 1, 0, 0, 0]),
        "hidden": torch.tensor([1.0, 1, 0, 1]),
    }
    # one head of width 2, 5 units, 3 coordinates: patch 3*4 + 3 = 15, final norm 6; norm1 6, qkv 3*2*3 + 6 = 24, proj 3*2 + 3 = 9,
    # norm2 6, fc1 5*3 + 5 = 20, fc2 3*5 + 3 = 18
    assert float(param_count(shape, keep)["total"]) == 15 + 6 + 6 + 24 + 9 + 6 + 20 + 18 == 104


def test_deterministic_count_is_the_pruned_models_numel_dense_and_routed() -> None:
    torch.manual_seed(0)
    for routed in (None, "token_choice", "mlp_selection"):
        vit, cfg = build(routed)
        masks = MaskSet(vit)
        with torch.no_grad():
            for gate in masks.gates.values():
                gate.log_alpha.normal_(0.5, 2.0)
        z = masks.deterministic()
        small = prune_and_rebuild(vit, cfg, masks, z)
        keep = {name: (value != 0).float() for name, value in z.items()}
        assert float(param_count(masks.shape, keep)["total"]) == sum(p.numel() for p in small.parameters()), routed


def test_expected_count_is_the_mean_count_of_sampled_masks() -> None:
    """The count is multilinear in independent gates, so E[count(z != 0)] = count(P(z != 0))."""
    torch.manual_seed(0)
    vit, _ = build("token_choice")
    masks = MaskSet(vit).train()
    with torch.no_grad():
        for gate in masks.gates.values():
            gate.log_alpha.normal_(0.0, 1.5)
    counts = [float(param_count(masks.shape, {n: (g.sample() != 0).float() for n, g in masks.gates.items()})["total"]) for _ in range(3000)]
    expected = float(param_count(masks.shape, masks.keep_probabilities())["total"])
    standard_error = torch.tensor(counts).std() / len(counts) ** 0.5
    assert abs(sum(counts) / len(counts) - expected) < 4 * float(standard_error)
    assert 0.0 < float(expected_sparsity(masks.shape, masks.keep_probabilities())) < 1.0
