"""Masks applied by hooks: open gates change nothing, a closed head is a head whose output is zero, masked LayerNorm."""

from __future__ import annotations

import torch
from torch import nn

from ssroute.prune.masks import MaskSet, masked_layer_norm, sort_expert_units
from tests.prune.helpers import build


def _set(masks: MaskSet, value: float) -> None:
    with torch.no_grad():
        for gate in masks.gates.values():
            gate.log_alpha.fill_(value)


def test_open_gates_leave_the_model_unchanged_and_hooks_go_away() -> None:
    torch.manual_seed(0)
    vit, _ = build("token_choice")
    x = torch.randn(4, 1, 8, 8)
    reference = vit(x)[0]
    masks = MaskSet(vit).eval()
    _set(masks, 20.0)  # every gate kept with value sigmoid(0.8 * 20 / beta) = 1
    with torch.no_grad(), masks.applied(vit):
        assert torch.allclose(vit(x)[0], reference, atol=1e-5)
    _set(masks, 0.0)
    with torch.no_grad(), masks.applied(vit):
        assert not torch.allclose(vit(x)[0], reference, atol=1e-3)
    assert torch.equal(vit(x)[0], reference)  # hooks and router offsets removed
    assert all(block.ffn.router.expert_logit_offset is None for block in vit.blocks[1:])


def test_a_closed_head_equals_zeroing_its_value_projection() -> None:
    torch.manual_seed(0)
    vit, _ = build(None)
    x = torch.randn(3, 1, 8, 8)
    masks = MaskSet(vit, ["heads"]).eval()
    _set(masks, 20.0)
    with torch.no_grad():
        masks.gates["heads_1"].log_alpha[2] = -20.0
        with masks.applied(vit):
            masked = vit(x)[0]
        hd = vit.blocks[1].attn.head_dim
        v = slice(2 * vit.dim + 2 * hd, 2 * vit.dim + 3 * hd)  # head 2's value rows of qkv
        vit.blocks[1].attn.qkv.weight[v] = 0.0
        vit.blocks[1].attn.qkv.bias[v] = 0.0
        assert torch.allclose(vit(x)[0], masked, atol=1e-5)


def test_masked_layer_norm_normalises_over_kept_coordinates_only() -> None:
    torch.manual_seed(0)
    norm = nn.LayerNorm(6)
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    x = torch.randn(4, 6)
    gate = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 1.0])
    kept = gate != 0
    expected = torch.zeros_like(x)
    expected[:, kept] = nn.functional.layer_norm(x[:, kept], (4,), norm.weight[kept], norm.bias[kept], norm.eps) * gate[kept]
    assert torch.allclose(masked_layer_norm(x, gate, norm), expected, atol=1e-6)
    assert torch.allclose(masked_layer_norm(x, torch.ones(6), norm), norm(x), atol=1e-6)


def test_a_closed_expert_is_never_routed_to() -> None:
    torch.manual_seed(0)
    vit, _ = build("token_choice")
    masks = MaskSet(vit, ["experts"]).eval()
    _set(masks, 20.0)
    with torch.no_grad():
        masks.gates["experts_1"].log_alpha[0] = -20.0
        with masks.applied(vit):
            _, aux = vit(torch.randn(8, 1, 8, 8))
    assert not bool((aux.routings[1].expert == 0).any()) and bool((aux.routings[2].expert == 0).any())


def test_sorting_expert_units_preserves_the_function() -> None:
    torch.manual_seed(0)
    vit, _ = build("token_choice")
    x = torch.randn(3, 1, 8, 8)
    before = vit(x)[0]
    with torch.no_grad():
        vit.blocks[1].ffn.experts.w_out.mul_(torch.rand_like(vit.blocks[1].ffn.experts.w_out))
    before = vit(x)[0]
    sort_expert_units(vit)
    bank = vit.blocks[1].ffn.experts
    importance = bank.w_in.norm(dim=1) * bank.w_out.norm(dim=2)
    assert bool((importance[:, :-1] >= importance[:, 1:]).all())
    assert torch.allclose(vit(x)[0], before, atol=1e-5)
