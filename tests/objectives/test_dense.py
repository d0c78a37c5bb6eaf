"""The dense patch loss: minimal for identical views, growing with mismatch; hard and soft partners."""

import pytest
import torch

from ssroute.data.correspondence import Correspondence, grid_correspondence
from ssroute.errors import ConfigError
from ssroute.layers.patch_embed import grid_centres
from ssroute.objectives.dense import DensePatchLoss


def everyone(batch: int, tokens: int) -> Correspondence:
    return Correspondence(torch.arange(tokens).expand(batch, tokens), torch.ones(batch, tokens, dtype=torch.bool), torch.zeros(batch, tokens, 2))


@pytest.mark.parametrize("loss", ["vicreg", "ntxent"])
def test_dense_loss_is_smallest_for_identical_views_and_grows_with_mismatch(loss):
    torch.manual_seed(0)
    dense = DensePatchLoss(dim=16, hidden=64, out=32, loss=loss)
    tokens = torch.randn(8, 16, 16)
    noise = torch.randn_like(tokens)
    values = [dense(tokens, tokens + scale * noise, everyone(8, 16)).item() for scale in (0.0, 0.3, 1.0, 3.0)]
    assert values == sorted(values) and values[-1] > values[0] + 0.1, values


def test_dense_loss_pairs_tokens_by_the_correspondence():
    torch.manual_seed(0)
    dense = DensePatchLoss(dim=8, hidden=32, out=16)
    tokens = torch.randn(4, 16, 8)
    shifted = tokens.roll(-1, dims=1)  # view 2's token i shows what view 1's token i + 1 shows
    match = Correspondence((torch.arange(16) - 1).clamp_min(0).expand(4, 16), (torch.arange(16) > 0).expand(4, 16), torch.zeros(4, 16, 2))
    assert dense(tokens, shifted, match) < dense(tokens, shifted, everyone(4, 16)) - 0.1


def test_dense_loss_without_pairs_is_zero_with_a_gradient_path():
    dense = DensePatchLoss(dim=8, hidden=16, out=8)
    tokens = torch.randn(2, 4, 8, requires_grad=True)
    nobody = Correspondence(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4, dtype=torch.bool), torch.zeros(2, 4, 2))
    out = dense(tokens, tokens, nobody)
    out.backward()
    assert out.item() == 0.0


def test_soft_and_hard_dense_losses_agree_on_centred_matches():
    torch.manual_seed(0)
    centres = grid_centres(8, 2).expand(4, -1, -1)
    match = grid_correspondence(centres, torch.eye(3).expand(4, 3, 3), torch.eye(3).expand(4, 3, 3), image_size=8, patch_size=2)
    soft, hard = DensePatchLoss(dim=8, hidden=16, out=8, soft=True), DensePatchLoss(dim=8, hidden=16, out=8, soft=False)
    hard.load_state_dict(soft.state_dict())
    a, b = torch.randn(4, 16, 8), torch.randn(4, 16, 8)
    assert torch.allclose(soft(a, b, match), hard(a, b, match))


def test_unknown_dense_loss_is_one_sentence():
    with pytest.raises(ConfigError, match="dense.loss='byol'"):
        DensePatchLoss(dim=8, loss="byol")
