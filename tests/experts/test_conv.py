"""Conv experts: a depthwise convolution over one image's rows of one expert, on the patch grid."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssroute.errors import ConfigError
from ssroute.experts import ExpertContext, build_experts
from ssroute.experts.conv import grid_shape
from ssroute.moe import build_moe, dense_reference


def _reference(bank, x, sizes, token, tokens_per_image):
    """Loop over (expert, image) cells: each cell's rows on a zero grid, one conv2d per cell."""
    height, width = grid_shape(tokens_per_image)
    out = torch.zeros_like(x)
    start = 0
    for e, size in enumerate(sizes):
        rows = torch.arange(start, start + size)
        image = token[rows] // tokens_per_image
        for img in image.unique():
            idx = rows[image == img]
            h = bank.act(x[idx] @ bank.w_in[e] + bank.b_in[e])
            grid = torch.zeros(bank.hidden, height * width)
            grid[:, token[idx] % tokens_per_image] = h.T
            conv = F.conv2d(
                grid.view(1, bank.hidden, height, width),
                bank.w_dw[e][:, None],
                bank.b_dw[e],
                padding=bank.kernel_size // 2,
                groups=bank.hidden,
            )
            mixed = conv.view(bank.hidden, -1)[:, token[idx] % tokens_per_image].T
            out[idx] = bank.act(mixed) @ bank.w_out[e] + bank.b_out[e]
        start += size
    return out


@pytest.mark.parametrize("tokens_per_image", [9, 6])  # a 3x3 grid; a row of 6 (not a square)
def test_matches_a_per_cell_loop_reference(tokens_per_image: int) -> None:
    torch.manual_seed(0)
    bank = build_experts("conv", dim=8, hidden=16, num_experts=3)
    token = torch.tensor([0, 4, 8, 10, 3, 12, 1, 16, 5, 7]) % (2 * tokens_per_image)  # 2 images; rows in any order within a block
    sizes = [4, 0, 6]
    x = torch.randn(10, 8)
    out = bank(x, sizes, ExpertContext(token, tokens_per_image, 2))
    assert torch.allclose(out, _reference(bank, x, sizes, token, tokens_per_image), atol=1e-5)


def test_a_token_reaches_only_its_grid_neighbours_of_the_same_expert_and_image() -> None:
    torch.manual_seed(0)
    bank = build_experts("conv", dim=8, hidden=16, num_experts=2)
    # 4x4 grid, 2 images. Expert 0, image 0: cells 0 (0,0), 1 (0,1), 5 (1,1), 10 (2,2); image 1: cell 16+1.
    # Expert 1, image 0: cell 4 (1,0), next to cell 0 but of another expert.
    token = torch.tensor([0, 1, 5, 10, 17, 4])
    x = torch.randn(6, 8)
    context = ExpertContext(token, 16, 2)
    out = bank(x, [5, 1], context)
    x2 = x.clone()
    x2[0] += 3.0  # the token at (0, 0) of expert 0, image 0
    changed = (bank(x2, [5, 1], context) - out).abs().sum(-1) > 1e-6
    assert changed.tolist() == [True, True, True, False, False, False]


def test_kernel_one_mixes_nothing_and_even_kernels_are_refused() -> None:
    bank = build_experts("conv", dim=8, hidden=16, num_experts=2, kernel_size=1)
    token = torch.tensor([0, 1, 2, 3])
    x = torch.randn(4, 8)
    alone = torch.cat([bank(x[i : i + 1], [1, 0], ExpertContext(token[i : i + 1], 4, 1)) for i in range(4)])
    assert torch.allclose(bank(x, [4, 0], ExpertContext(token, 4, 1)), alone, atol=1e-6)
    with pytest.raises(ConfigError, match="kernel_size=2 must be a positive odd number"):
        build_experts("conv", dim=8, hidden=16, num_experts=2, kernel_size=2)


@pytest.mark.parametrize("router", ["token_choice", "expert_choice", "soft_moe"])
def test_matches_the_dense_reference_with_partly_filled_slots(router: str) -> None:
    torch.manual_seed(0)
    moe = build_moe(dim=16, hidden=24, num_experts=4, router=router, experts="conv")
    flat = torch.randn(3 * 16, 16)
    routing = moe.router(flat, tokens_per_group=16)
    assert torch.allclose(moe.execute(flat, routing), dense_reference(moe.experts, flat, routing), atol=1e-5)


def test_needs_its_context() -> None:
    with pytest.raises(ConfigError, match="needs an ExpertContext"):
        build_experts("conv", dim=8, hidden=16, num_experts=2)(torch.randn(3, 8), [3, 0], None)
