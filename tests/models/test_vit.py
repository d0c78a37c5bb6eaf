import pytest
import torch

from ssroute.errors import ConfigError
from ssroute.layers.patch_embed import PatchEmbed, grid_centres
from ssroute.models.vit import ViT


@pytest.mark.parametrize("image_size,patch_size", [(8, 1), (8, 2), (8, 4), (28, 4), (28, 7), (32, 8)])
def test_vit_shapes_for_several_patch_sizes(image_size, patch_size):
    vit = ViT(image_size=image_size, channels=3, dim=32, depth=2, heads=4, patch_size=patch_size)
    images = torch.randn(2, 3, image_size, image_size)
    features, aux = vit(images, keep_blocks=True)
    assert aux.block_tokens[-1].shape == (2, (image_size // patch_size) ** 2, 32)
    assert features.shape == (2, 32) and len(aux.block_tokens) == 2


def test_patch_size_must_divide_image_size():
    with pytest.raises(ConfigError, match=r"model.patch_size=3 does not divide the image size 8; choose one of \[1, 2, 4, 8\]"):
        ViT(image_size=8, channels=1, patch_size=3)


def test_grid_centres_are_patch_centres_in_pixels():
    centres = grid_centres(8, 4)
    assert centres.tolist() == [[1.5, 1.5], [5.5, 1.5], [1.5, 5.5], [5.5, 5.5]]


def test_positions_distinguish_every_patch():
    embed = PatchEmbed(channels=1, patch_size=1, dim=32, image_size=8)
    distances = torch.cdist(embed.position, embed.position)
    assert (distances + torch.eye(64) * 10).min() > 1e-3


def test_ffn_factory_replaces_the_ffn_of_each_block():
    vit = ViT(image_size=8, channels=1, dim=16, depth=3, heads=2, ffn_factory=lambda i: torch.nn.Identity())
    assert all(isinstance(block.ffn, torch.nn.Identity) for block in vit.blocks)


def test_backbone_from_config_puts_moe_layers_where_asked():
    from omegaconf import OmegaConf

    from ssroute.config import PretrainConfig
    from ssroute.layers.mlp import FeedForward
    from ssroute.models import build_backbone
    from ssroute.moe import MoELayer

    cfg = OmegaConf.structured(PretrainConfig())
    cfg.model.patch_size, cfg.model.moe_layers, cfg.model.num_experts = 2, [1, 3], 4
    cfg.router = {"name": "token_choice", "k": 2}
    vit = build_backbone(cfg, image_size=8, channels=1)
    kinds = [type(block.ffn) for block in vit.blocks]
    assert kinds == [FeedForward, MoELayer, FeedForward, MoELayer]
    assert vit.blocks[1].ffn.router.num_experts == 4
    out, aux = vit(torch.randn(3, 1, 8, 8))
    out.sum().backward()
    assert sorted(aux.routings) == [1, 3] and aux.losses["router_aux"].ndim == 0
    cfg.model.moe_layers = [4]
    with pytest.raises(ConfigError, match=r"model.moe_layers=\[4\] names blocks outside 0..3"):
        build_backbone(cfg, image_size=8, channels=1)
