"""Attention heads as experts: the sort-and-gather execution equals a per-token reference; ReLU attention; accounting."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from ssroute.config import PretrainConfig
from ssroute.errors import ConfigError
from ssroute.layers.attention import Attention, attention_weights
from ssroute.models import build_backbone
from ssroute.moe.accounting import model_accounting
from ssroute.moe.attention_heads import build_attention_heads


def _reference(moa, x, routing, mask=None):
    """Per (token, head) pair, by hand: the head's query over its image's shared keys and values."""
    batch, tokens, dim = x.shape
    keys, values = moa.kv(x).chunk(2, dim=-1)
    out = moa.b_o.expand(batch * tokens, dim).clone()
    flat = x.reshape(-1, dim)
    for t, head, w in zip(routing.token.tolist(), routing.expert.tolist(), routing.weight.tolist(), strict=True):
        image = t // tokens
        q = flat[t] @ moa.w_q[head] + moa.b_q[head]
        scores = keys[image] @ q / math.sqrt(moa.head_dim)
        if moa.kind == "relu":
            keep = torch.ones(tokens) if mask is None else mask[image].float()
            weights = torch.relu(scores) * keep / keep.sum()
        else:
            weights = torch.softmax(scores if mask is None else scores.masked_fill(~mask[image], float("-inf")), -1)
        out[t] += w * ((weights @ values[image]) @ moa.w_o[head])
    return out.view(batch, tokens, dim)


@pytest.mark.parametrize("kind", ["softmax", "relu"])
def test_sorted_execution_equals_the_per_token_reference(kind: str) -> None:
    torch.manual_seed(0)
    moa = build_attention_heads(dim=16, heads=4, k=2, head_dim=8, kind=kind).eval()
    with torch.no_grad():
        moa.b_o.normal_()
    x = torch.randn(3, 7, 16)
    mask = torch.rand(3, 7) > 0.3
    mask[:, 0] = True
    for m in (None, mask):
        y, routing = moa.forward_with_routing(x, m)
        assert torch.allclose(y, _reference(moa, x, routing, m), atol=1e-5)
        assert routing.experts_per_token().eq(2).all()


def test_relu_attention_divides_by_the_number_of_real_keys() -> None:
    torch.manual_seed(0)
    attn = Attention(dim=8, heads=2, kind="relu").eval()
    x = torch.randn(2, 5, 8)
    qkv = attn.qkv(x).reshape(2, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
    weights = torch.relu(qkv[0] @ qkv[1].transpose(-2, -1) / 2.0) / 5
    expected = attn.proj((weights @ qkv[2]).transpose(1, 2).reshape(2, 5, 8))
    assert torch.allclose(attn(x), expected, atol=1e-6)
    mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    scores = torch.randn(2, 1, 5, 5)
    w = attention_weights(scores, mask[:, None, :], "relu")
    assert torch.allclose(w[0, 0, :, 3:], torch.zeros(5, 2)) and torch.allclose(w[0, 0], torch.relu(scores[0, 0]) * mask[0] / 3)
    with pytest.raises(ConfigError, match="model.attention='tanh' is not an attention; choose softmax or relu"):
        Attention(8, 2, kind="tanh")


def _vit(overrides: dict):
    cfg = OmegaConf.structured(PretrainConfig)
    cfg.model.dim, cfg.model.depth, cfg.model.patch_size = 32, 3, 2
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    return build_backbone(cfg, 8, 1)


def test_accounting_counts_k_of_e_heads_active() -> None:
    vit = _vit({"model.moa": {"layers": [1], "heads": 8, "k": 2}, "model.attention": "relu"})
    stats = model_accounting(vit, tokens_per_image=16)
    assert stats["params_total"] == sum(p.numel() for p in vit.parameters())
    moa = vit.blocks[1].attn
    per_head = moa.w_q[0].numel() + moa.b_q[0].numel() + moa.w_o[0].numel()
    assert stats["params_total"] - stats["params_active"] == 6 * per_head
    assert stats["attention_heads_layers"] == 1.0 and stats["moe_layers"] == 0.0 and 0 < stats["expert_flop_share"] < 1
    features, aux = vit(torch.randn(4, 1, 8, 8))
    assert 1 in aux.routings and "router_aux" in aux.losses  # the heads' routing is handed up like an MoE layer's


def test_moa_must_sit_in_a_block_with_a_dense_ffn() -> None:
    with pytest.raises(ConfigError, match=r"model.moa.layers=\[1\] must name blocks below model.depth whose FFN is dense"):
        _vit({"model.moa": {"layers": [1]}, "model.moe_layers": [1]})


@pytest.mark.parametrize("attention", ["softmax", "relu"])
def test_a_vit_with_routed_heads_fits_a_small_batch(attention: str) -> None:
    torch.manual_seed(0)
    vit = _vit({"model.moa": {"layers": [0, 1, 2], "heads": 4, "k": 2}, "model.attention": attention})
    head = torch.nn.Linear(32, 4)
    images, labels = torch.randn(32, 1, 8, 8), torch.randint(0, 4, (32,))
    optimizer = torch.optim.AdamW([*vit.parameters(), *head.parameters()], lr=3e-3)
    losses = []
    for _ in range(60):
        features, aux = vit(images)
        loss = torch.nn.functional.cross_entropy(head(features), labels) + aux.losses["router_aux"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
