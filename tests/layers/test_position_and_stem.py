"""Rotary positions keep tokens position-free; the convolutional stem lands on the patch grid."""

import pytest
import torch

from ssroute.errors import ConfigError
from ssroute.layers.patch_embed import PatchEmbed, conv_stem, grid_centres
from ssroute.layers.rope import AxialRope, rotate
from ssroute.models.vit import ViT


def test_rope_scores_depend_only_on_offsets():
    rope = AxialRope(head_dim=16, patch_size=4)
    centres = torch.rand(2, 6, 2) * 28
    q, k = torch.randn(2, 3, 6, 16), torch.randn(2, 3, 6, 16)
    here, there = rope(centres), rope(centres + torch.tensor([8.0, -12.0]))
    scores = rotate(q, *here) @ rotate(k, *here).transpose(-1, -2)
    assert torch.allclose(scores, rotate(q, *there) @ rotate(k, *there).transpose(-1, -2), atol=1e-4)
    assert not torch.allclose(scores, q @ k.transpose(-1, -2), atol=1e-2)  # positions do change the scores
    assert torch.allclose(rotate(q, *here).norm(dim=-1), q.norm(dim=-1), atol=1e-5)  # a rotation


@pytest.mark.parametrize("position", ["rope", "absolute"])
def test_only_rotary_positions_make_the_stack_translation_equivariant(position):
    torch.manual_seed(0)
    vit = ViT(image_size=8, channels=1, dim=16, depth=2, heads=2, patch_size=2, position=position).eval()
    tokens, centres = torch.randn(3, 16, 16), grid_centres(8, 2).expand(3, -1, -1)
    if position == "absolute":  # the tokens carry their position code, as the patch embedding adds it
        tokens_moved = tokens + vit.patch_embed.position.roll(1, dims=0)
        tokens = tokens + vit.patch_embed.position
    else:
        tokens_moved = tokens
    moved = vit.encode(tokens_moved, centres=centres + 2.0)  # the same contents, every patch one patch to the right
    assert torch.allclose(vit.encode(tokens, centres=centres), moved, atol=1e-5) == (position == "rope")


def test_rope_needs_a_head_width_divisible_by_four():
    with pytest.raises(ConfigError, match="divisible by 4"):
        ViT(image_size=8, channels=1, dim=12, depth=1, heads=2, patch_size=2, position="rope")


@pytest.mark.parametrize(("image_size", "patch_size"), [(8, 1), (8, 2), (28, 4), (28, 7), (32, 8)])
def test_conv_stem_gives_the_patch_grid(image_size, patch_size):
    stem = conv_stem(3, patch_size, 32)
    side = image_size // patch_size
    assert stem(torch.randn(2, 3, image_size, image_size)).shape == (2, 32, side, side)


def test_conv_stem_sampled_at_grid_centres_equals_its_grid_tokens():
    torch.manual_seed(0)
    embed = PatchEmbed(channels=1, patch_size=4, dim=16, image_size=28, stem="conv", position="rope").eval()
    images = torch.randn(2, 1, 28, 28)
    grid = embed.embed(images).tokens
    assert torch.allclose(embed.embed_at(images, grid_centres(28, 4).expand(2, -1, -1)), grid, atol=1e-5)


def test_conv_stem_cells_are_centred_on_the_grid():
    """A single bright pixel at a grid centre moves the stem's output most in that centre's cell."""
    torch.manual_seed(0)
    stem = conv_stem(1, 4, 8).eval()
    with torch.no_grad():
        for m in stem.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.fill_(1.0 / m.weight[0].numel())  # box filters: the response is largest where the pixel is most central
    base = stem(torch.zeros(1, 1, 28, 28))
    for cell in (0, 10, 24, 48):
        x, y = (grid_centres(28, 4)[cell] - 0.5).tolist()  # a 2x2 block of pixels around the (half-pixel) centre
        image = torch.zeros(1, 1, 28, 28)
        image[0, 0, int(y) : int(y) + 2, int(x) : int(x) + 2] = 1.0
        response = (stem(image) - base).abs().sum(dim=1).flatten()
        assert int(response.argmax()) == cell


def test_unknown_position_or_stem_is_one_sentence():
    with pytest.raises(ConfigError, match="model.position='sincos'"):
        PatchEmbed(1, 2, 16, 8, position="sincos")
    with pytest.raises(ConfigError, match="model.stem='resnet'"):
        PatchEmbed(1, 2, 16, 8, stem="resnet")
