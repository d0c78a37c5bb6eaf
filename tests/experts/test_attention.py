"""Attention experts: attention only among one image's rows of one expert, batched without loops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssroute.errors import ConfigError
from ssroute.experts import ExpertContext, build_experts
from ssroute.moe import build_moe


def _reference(bank, x, sizes, image):
    """Loop over (expert, image) cells: plain multi-head attention on each cell's rows."""
    out = torch.zeros_like(x)
    start = 0
    for e, size in enumerate(sizes):
        for img in image[start : start + size].unique():
            idx = start + (image[start : start + size] == img).nonzero().squeeze(1)
            qkv = x[idx] @ bank.w_qkv[e] + bank.b_qkv[e]
            q, k, v = qkv.view(len(idx), 3, bank.heads, -1).permute(1, 2, 0, 3)
            att = F.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v
            out[idx] = att.transpose(0, 1).reshape(len(idx), -1) @ bank.w_out[e] + bank.b_out[e]
        start += size
    return out


def test_matches_a_per_cell_loop_reference() -> None:
    torch.manual_seed(0)
    bank = build_experts("attention", dim=8, hidden=16, num_experts=3, heads=2)
    with torch.no_grad():
        bank.b_qkv.normal_()
    token = torch.tensor([0, 7, 3, 5, 9, 1, 11, 4, 2])  # 3 images x 4 tokens, rows in any order within a block
    sizes = [4, 0, 5]
    x = torch.randn(9, 8)
    out = bank(x, sizes, ExpertContext(token, 4, 3))
    assert torch.allclose(out, _reference(bank, x, sizes, token // 4), atol=1e-5)


def test_images_and_experts_do_not_mix() -> None:
    torch.manual_seed(0)
    bank = build_experts("attention", dim=8, hidden=16, num_experts=2, heads=4)
    token = torch.tensor([0, 1, 4, 5, 2, 6])  # expert 0: image 0 rows 0-1, image 1 rows 2-3; expert 1: rows 4-5
    x = torch.randn(6, 8)
    out = bank(x, [4, 2], ExpertContext(token, 4, 2))
    x2 = x.clone()
    x2[2] += 5.0  # an image-1 row of expert 0
    out2 = bank(x2, [4, 2], ExpertContext(token, 4, 2))
    changed = (out2 - out).abs().sum(-1) > 1e-6
    assert changed.tolist() == [False, False, True, True, False, False]


def test_soft_moe_slots_attend_within_their_image() -> None:
    moe = build_moe(dim=8, hidden=16, num_experts=2, router="soft_moe", experts="attention", slots_per_expert=3, heads=2)
    x = torch.randn(2, 5, 8)
    out = moe(x)
    x2 = x.clone()
    x2[1] += 1.0
    assert torch.allclose(moe(x2)[0], out[0], atol=1e-6)  # image 0 untouched by image 1


def test_heads_must_divide_hidden() -> None:
    with pytest.raises(ConfigError, match="heads=3 must divide the expert hidden width 16"):
        build_experts("attention", dim=8, hidden=16, num_experts=2, heads=3)
