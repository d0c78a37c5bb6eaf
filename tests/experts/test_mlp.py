"""MLP expert bank: stacked weights, block-wise execution, depth and activation."""

from __future__ import annotations

import pytest
import torch

from ssroute.errors import ConfigError
from ssroute.experts import EXPERTS, ExpertContext, build_experts
from ssroute.layers.mlp import FeedForward


def _as_dense(bank, e: int) -> FeedForward:
    ffn = FeedForward(bank.dim, bank.hidden, activation="gelu")
    with torch.no_grad():
        ffn.fc1.weight.copy_(bank.w_in[e].t())
        ffn.fc1.bias.copy_(bank.b_in[e])
        ffn.fc2.weight.copy_(bank.w_out[e].t())
        ffn.fc2.bias.copy_(bank.b_out[e])
    return ffn


def test_each_block_runs_its_own_expert() -> None:
    torch.manual_seed(0)
    bank = build_experts("mlp", dim=8, hidden=16, num_experts=3)
    sizes = [4, 0, 5]
    x = torch.randn(9, 8)
    out = bank(x, sizes, ExpertContext(torch.arange(9), 3, 3))
    assert out.shape == (9, 8)
    assert torch.allclose(out[:4], _as_dense(bank, 0)(x[:4]), atol=1e-6)
    assert torch.allclose(out[4:], _as_dense(bank, 2)(x[4:]), atol=1e-6)


def test_unused_experts_get_no_gradient_signal() -> None:
    bank = build_experts("mlp", dim=8, hidden=16, num_experts=3)
    bank(torch.randn(6, 8), [3, 0, 3], None).sum().backward()
    assert bool(bank.w_in.grad[1].eq(0).all()) and bool(bank.w_in.grad[0].ne(0).any())


def test_depth_and_activation() -> None:
    bank = build_experts("mlp", dim=8, hidden=16, num_experts=2, depth=4, activation="relu")
    assert bank.w_mid.shape == (2, 2, 16, 16)
    assert bank.params_per_expert() == 8 * 16 + 16 + 2 * (16 * 16 + 16) + 16 * 8 + 8
    assert bank.flops_per_row(49) == 2 * (2 * 8 * 16 + 2 * 16 * 16)
    assert bank(torch.randn(5, 8), [2, 3], None).shape == (5, 8)
    with pytest.raises(ConfigError, match="depth=1"):
        build_experts("mlp", dim=8, hidden=16, num_experts=2, depth=1)
    with pytest.raises(ConfigError, match="activation 'tanh'"):
        build_experts("mlp", dim=8, hidden=16, num_experts=2, activation="tanh")


def test_registry_and_options() -> None:
    assert "mlp" in EXPERTS.names()
    with pytest.raises(ConfigError, match="expert bank 'mlp' has no option 'width'.*depth, activation"):
        build_experts("mlp", dim=8, hidden=16, num_experts=2, width=3)


def test_context_image_index() -> None:
    context = ExpertContext(torch.tensor([5, 0, 9]), tokens_per_image=4, num_images=3)
    assert context.image_index.tolist() == [1, 0, 2]
    slots = ExpertContext(None, 4, 2, slot_image=torch.tensor([0, 1, 0, 1]))
    assert slots.image_index.tolist() == [0, 1, 0, 1]
