"""The ViT with selected patches: positions from continuous centres, halting and masks, correspondences, pretraining."""

import json
import math

import pytest
import torch

from ssroute.config import PatchesConfig
from ssroute.data.correspondence import view_matches
from ssroute.layers.patch_embed import grid_centres, sincos_position
from ssroute.models import ViT
from ssroute.patches import PATCH_SELECTORS, build_patch_selector
from ssroute.patches.sequential import SequentialPatches
from ssroute.train.pretrain import run_pretrain


def test_selected_grid_positions_embed_exactly_like_the_grid():
    torch.manual_seed(0)
    grid = ViT(image_size=8, channels=3, dim=32, depth=1, heads=4, patch_size=2)
    selector = build_patch_selector(PatchesConfig(name="entropy_topk", stride=2), patch_size=2, image_size=8, dim=32)  # all 16 grid cells
    selected = ViT(image_size=8, channels=3, dim=32, depth=1, heads=4, patch_size=2, selector=selector)
    selected.load_state_dict(grid.state_dict())
    images = torch.randn(3, 3, 8, 8)
    patches = selected.embed(images)
    order = (patches.centres[..., 1] * 8 + patches.centres[..., 0]).argsort(dim=1)  # back to row-major
    tokens = patches.tokens.gather(1, order[..., None].expand(-1, -1, 32))
    assert torch.allclose(tokens, grid.embed(images).tokens, atol=1e-5)
    assert torch.allclose(selected(images)[0], grid(images)[0], atol=1e-5)  # the pool does not care about order


def test_positions_round_trip_through_the_sincos_code():
    dim, scale = 64, 28.0
    centres = torch.rand(100, 2) * 27
    code = sincos_position(centres, dim, scale)
    quarter = dim // 4
    slowest = quarter - 1  # lowest frequency: its angle stays below pi over the image, so it decodes uniquely
    freq = math.exp(-slowest * 9.21 / quarter) * 100.0 / scale
    sin = code.view(100, 2, 2 * quarter)[..., slowest]
    cos = code.view(100, 2, 2 * quarter)[..., quarter + slowest]
    assert torch.allclose(torch.atan2(sin, cos) / freq, centres, atol=1e-3)
    grid = grid_centres(28, 4)
    assert torch.equal(sincos_position(grid.clone(), dim, scale), sincos_position(grid, dim, scale))


def test_masked_tokens_change_neither_attention_nor_the_pool():
    torch.manual_seed(0)
    vit = ViT(image_size=8, channels=1, dim=16, depth=2, heads=2, patch_size=2)
    tokens = torch.randn(2, 6, 16)
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 2 + [False] * 4])
    weights = mask.float() / mask.sum(dim=1, keepdim=True)
    before = vit.encode(tokens, mask, weights)
    noisy = torch.where(mask[..., None], tokens, 100 * torch.randn_like(tokens))
    assert torch.allclose(vit.encode(noisy, mask, weights), before, atol=1e-5)
    assert torch.allclose(vit.encode(tokens[:1, :4]), before[:1], atol=1e-5)  # as if the padding were absent


def test_sequential_vit_halting_head_learns_from_the_features():
    torch.manual_seed(0)
    selector = SequentialPatches(patch_size=2, image_size=8, num_patches=6, dim=16)
    vit = ViT(image_size=8, channels=1, dim=16, depth=1, heads=2, patch_size=2, selector=selector)
    vit(torch.rand(4, 1, 8, 8))[0].pow(2).sum().backward()
    assert selector.halt_head[1].weight.grad.abs().sum() > 0


def test_view_matches_pair_selected_patches_and_skip_untaken_ones():
    centres = torch.tensor([[[1.0, 1.0], [4.0, 4.0], [6.0, 1.0], [2.0, 6.0], [5.5, 5.5]]])
    shifted = centres[:, [2, 0, 1, 4, 3]] + 0.4  # view 2: the same places, another order, 0.4 px away
    mask = torch.tensor([[True, True, False, True, True]])
    identity = torch.eye(3)[None]
    m12, m21 = view_matches((identity, identity), (centres, shifted), 8, 2, grid=False, masks=(None, mask))
    assert m12.partner.tolist() == [[1, 0, 0, 4, 3]] and m12.valid.tolist() == [[True, False, True, True, True]]  # view-2 patch 2 not taken
    assert m21.valid.tolist() == [[True, True, False, True, True]] and m21.partner[0, [0, 1, 3, 4]].tolist() == [2, 0, 4, 3]


def test_each_forward_returns_the_patches_it_took():
    selector = build_patch_selector(PatchesConfig(name="random", num_patches=3), patch_size=2, image_size=8, dim=16)
    vit = ViT(image_size=8, channels=1, dim=16, depth=1, heads=2, patch_size=2, selector=selector)
    (_, first), (_, second) = vit(torch.zeros(2, 1, 8, 8)), vit(torch.zeros(2, 1, 8, 8))
    assert first.patches.centres.shape == (2, 3, 2) and not torch.equal(first.patches.centres, second.patches.centres)
    assert not any(isinstance(v, torch.Tensor) for v in vars(vit.patch_embed).values())  # nothing is left on the module


@pytest.mark.slow
def test_halting_selection_trains_inside_a_layerwise_stack(tmp_path, pretrain_cfg):
    # the stage encoders run the backbone's own forward, so the key mask and pool weights reach every stage
    overrides = ["patches=sequential", "patches.num_patches=9", "model.stack=[ssl,route,ssl]", "model.num_experts=4", "schedule=layerwise",
                 "trainer.max_epochs=3", "trainer.limit_train_batches=1", "trainer.log_every_n_steps=1", "data.train_subset=128", "data.batch_size=64"]  # fmt: skip
    run = run_pretrain(pretrain_cfg(overrides), tmp_path / "stack")
    rows = (run / "logs" / "metrics.csv").read_text().splitlines()
    column = rows[0].split(",").index("loss/ponder")
    assert sum(1 for r in rows[1:] if r.split(",")[column]) == 3  # a ponder cost in each of the three stages


@pytest.mark.slow
@pytest.mark.parametrize("name", PATCH_SELECTORS.names())
def test_a_routed_pretraining_step_runs_with_consistency_for_every_selector(tmp_path, pretrain_cfg, name):
    overrides = [
        f"patches={name}",
        "patches.num_patches=9",
        "model.moe_layers=[1]",
        "model.num_experts=4",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=1",
        "trainer.log_every_n_steps=1",
        "data.train_subset=128",
        "data.batch_size=64",
    ]
    run = run_pretrain(pretrain_cfg(overrides), tmp_path / name)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 1 and metrics["routing_agreement"] > metrics["routing_agreement_chance"]
    logged = (run / "logs" / "metrics.csv").read_text()
    assert "loss/consistency" in logged and (("loss/ponder" in logged) == (name == "sequential"))
