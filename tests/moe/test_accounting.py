"""Total vs active parameters and FLOPs per token."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ssroute.layers.block import TransformerBlock
from ssroute.layers.mlp import FeedForward
from ssroute.moe import build_moe, model_accounting

D, H, E = 16, 64, 8
FFN_PARAMS = D * H + H + H * D + D
FFN_FLOPS = 2 * 2 * D * H


def test_dense_model_has_no_expert_share() -> None:
    stats = model_accounting(nn.Sequential(FeedForward(D, H), nn.LayerNorm(D)), tokens_per_image=10)
    assert stats["expert_param_share"] == stats["expert_flop_share"] == 0.0
    assert stats["params_active"] == stats["params_total"] == FFN_PARAMS + 2 * D
    assert stats["flops_per_token"] == FFN_FLOPS


def test_top1_moe_has_the_active_size_of_the_dense_ffn() -> None:
    stats = model_accounting(build_moe(dim=D, hidden=H, num_experts=E, router="token_choice", k=1), tokens_per_image=10)
    router = D * E
    assert stats["params_total"] == E * FFN_PARAMS + router
    assert stats["params_active"] == FFN_PARAMS + router
    assert stats["flops_per_token"] == FFN_FLOPS + 2 * D * E
    assert stats["expert_param_share"] == pytest.approx(E * FFN_PARAMS / (E * FFN_PARAMS + router))
    assert stats["expert_flop_share"] == pytest.approx(FFN_FLOPS / (FFN_FLOPS + 2 * D * E))


def test_k_and_expert_choice_scale_expert_flops() -> None:
    two = model_accounting(build_moe(dim=D, hidden=H, num_experts=E, k=2), 10)
    assert two["flops_experts_per_token"] == 2 * FFN_FLOPS and two["params_active"] == 2 * FFN_PARAMS + D * E
    ec = model_accounting(build_moe(dim=D, hidden=H, num_experts=E, router="expert_choice", capacity_factor=1.0), 12)
    assert ec["flops_experts_per_token"] == pytest.approx(E * 2 / 12 * FFN_FLOPS)  # capacity ceil(12/8) = 2


def test_soft_moe_activates_every_expert_but_computes_slots() -> None:
    stats = model_accounting(build_moe(dim=D, hidden=H, num_experts=E, router="soft_moe", slots_per_expert=1), 16)
    assert stats["params_active"] == stats["params_total"]
    assert stats["flops_experts_per_token"] == pytest.approx(E / 16 * FFN_FLOPS)


def test_dynamic_k_uses_the_measured_k_after_a_forward() -> None:
    moe = build_moe(dim=D, hidden=H, num_experts=E, router="top_p", p=0.9)
    before = model_accounting(moe, 10)["flops_experts_per_token"]
    assert before == E * FFN_FLOPS  # no forward yet: the cap max_k = E
    _, routing = moe.forward_with_routing(torch.randn(4, 10, D))
    measured = routing.token.numel() / 40
    assert model_accounting(moe, 10, {0: measured})["flops_experts_per_token"] == pytest.approx(measured * FFN_FLOPS)


def test_blocks_add_attention_and_count_shared_modules_once() -> None:
    moe = build_moe(dim=D, hidden=H, num_experts=E)
    model = nn.Sequential(TransformerBlock(D, 4, FeedForward(D, H)), TransformerBlock(D, 4, moe))
    stats = model_accounting(model, tokens_per_image=10)
    attention = 2 * (3 * D * D + D * D) + 4 * 10 * D
    assert stats["flops_per_token"] == 2 * attention + 2 * FFN_FLOPS + 2 * D * E
    assert stats["params_total"] == sum(p.numel() for p in model.parameters())
    assert stats["params_total"] - stats["params_active"] == (E - 1) * FFN_PARAMS
    assert stats["moe_layers"] == 1.0
