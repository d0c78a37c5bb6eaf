"""Content or position: a router keyed on the patch grid scores NMI 1 and follows position; one keyed on pixels follows content."""

import pytest
import torch

from ssroute.eval.position import position_metrics, shift_images
from ssroute.models.vit import ViT
from ssroute.moe import build_moe


def images(count=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 1, 8, 8), dtype=torch.uint8, generator=g)


def vit(router: str, **options) -> ViT:
    torch.manual_seed(0)
    return ViT(image_size=8, channels=1, dim=16, depth=1, heads=2, patch_size=2,
               ffn_factory=lambda i: build_moe(dim=16, hidden=16, num_experts=4, router=router, **options))  # fmt: skip


def normalize(x):
    return x.float() / 255.0


def test_shift_moves_content_by_whole_pixels_with_zero_padding():
    x = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4)
    moved = shift_images(x, 2, 0)
    assert moved[0, 0, :, 2:].tolist() == x[0, 0, :, :2].tolist() and (moved[0, 0, :, :2] == 0).all()
    assert shift_images(x, 0, -1)[0, 0, :3].tolist() == x[0, 0, 1:].tolist()


def test_a_position_keyed_router_is_fully_predicted_by_position_and_follows_it():
    model = vit("hash", key="position")  # expert = a fixed function of the token's position
    m = position_metrics(model, normalize, images())
    # the expert is a function of the position: I(expert; position) = H(expert), the most NMI can be with 4 experts and 16 positions
    assert m["block0/routing_position_nmi"] == pytest.approx(2 * 2 / (2 + 4))
    assert m["block0/routing_position_majority"] == 1.0
    assert m["routing_shift_content"] == 0.0 and m["routing_shift_position"] == 1.0


def test_a_router_that_sees_only_pixels_follows_the_content():
    model = vit("token_choice", capacity_factor=None, noise_std=0.0)
    with torch.no_grad():  # no position code and no attention mixing: the router sees the patch's own pixels only
        model.patch_embed.position.zero_()
        for p in model.blocks[0].attn.parameters():
            p.zero_()
        torch.nn.init.normal_(model.patch_embed.proj.weight, std=1.0)  # pixels, not the shared bias, set the tokens apart
        torch.nn.init.normal_(model.blocks[0].ffn.router.gate.weight, std=1.0)
    m = position_metrics(model, normalize, images())
    assert m["routing_shift_content"] == 1.0 and m["routing_shift_position"] == 0.0
    assert m["block0/routing_position_nmi"] < 0.1


def test_selected_patches_are_measured_too():
    from ssroute.config import PatchesConfig
    from ssroute.patches import build_patch_selector

    selector = build_patch_selector(PatchesConfig(name="entropy_topk", stride=2), patch_size=2, image_size=8, dim=16)
    model = ViT(image_size=8, channels=1, dim=16, depth=1, heads=2, patch_size=2, selector=selector,
                ffn_factory=lambda i: build_moe(dim=16, hidden=16, num_experts=4, router="token_choice", capacity_factor=None))  # fmt: skip
    m = position_metrics(model, normalize, images())
    shares = m["routing_shift_content"] + m["routing_shift_position"] + m["routing_shift_dropped"]
    assert "routing_position_nmi" in m and 0.0 < shares <= 1.0 + 1e-9
