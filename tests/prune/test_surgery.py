"""Physically removing masked heads, units, experts and hidden coordinates leaves the outputs unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ssroute.prune.masks import MaskSet
from ssroute.prune.surgery import prune_head
from tests.prune.helpers import build, prune_and_rebuild


def _random_gates(masks: MaskSet, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in masks.gates.values():
            gate.log_alpha.copy_(torch.randn(gate.shape, generator=generator) * 2.0)


@pytest.mark.parametrize("router", [None, "token_choice", "mlp_selection"])
@pytest.mark.parametrize("structures", [None, ["heads", "units"], ["mha", "ffn", "experts"], ["hidden"]])
def test_pruned_model_equals_the_masked_one(router, structures) -> None:
    if structures == ["mha", "ffn", "experts"] and router is None:
        structures = ["mha", "ffn"]
    torch.manual_seed(0)
    vit, cfg = build(router)
    masks = MaskSet(vit, structures).eval()
    _random_gates(masks, seed=1)
    x = torch.randn(6, 1, 8, 8)
    with torch.no_grad(), masks.applied(vit):
        masked = vit(x)[0]
        z = dict(masks.z)
    assert any(bool((value == 0).any()) for value in z.values()), "the gates removed nothing: the test would prove nothing"
    small = prune_and_rebuild(vit, cfg, masks, z)
    with torch.no_grad():
        pruned = small(x)[0]
    if "hidden" in z:
        masked = masked[:, z["hidden"] != 0]
    assert pruned.shape[1] <= vit.dim and sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in vit.parameters())
    assert (pruned - masked).abs().max() < 1e-5


def test_removed_structures_are_gone_and_whole_layers_add_nothing() -> None:
    torch.manual_seed(0)
    vit, cfg = build("token_choice")
    masks = MaskSet(vit).eval()
    _random_gates(masks, seed=2)
    with torch.no_grad():
        masks.gates["mha"].log_alpha.copy_(torch.tensor([-9.0, 9.0, 9.0]))  # block 0 loses its attention
        masks.gates["ffn"].log_alpha.copy_(torch.tensor([9.0, -9.0, 9.0]))  # block 1 loses its MoE layer
    z = masks.deterministic()
    small = prune_and_rebuild(vit, cfg, masks, z)
    assert small.blocks[0].attn.heads == 0 and bool((small.blocks[0].attn.proj.bias == 0).all())
    assert small.blocks[1].ffn.experts.hidden == 0 and bool((small.blocks[1].ffn.experts.b_out == 0).all())
    assert small.blocks[2].ffn.num_experts == int((z["experts_2"] != 0).sum()) >= 2
    assert small.blocks[2].attn.heads == int((z["heads_2"] != 0).sum())
    x = torch.randn(2, 16, small.dim)
    assert torch.equal(small.blocks[0].attn(x), torch.zeros_like(x))


def test_classifier_head_follows_the_hidden_dimension() -> None:
    torch.manual_seed(0)
    vit, cfg = build(None)
    head = nn.Sequential(nn.BatchNorm1d(vit.dim, affine=False), nn.Linear(vit.dim, 10))
    head.train()(torch.randn(64, vit.dim) * 3 + 1)  # running statistics that are not the defaults
    head.eval()
    masks = MaskSet(vit, ["hidden", "units"]).eval()
    _random_gates(masks, seed=3)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad(), masks.applied(vit, head[-1]):
        logits = head(vit(x)[0])
        z = dict(masks.z)
    small = prune_and_rebuild(vit, cfg, masks, z)
    small_head = nn.Sequential(nn.BatchNorm1d(small.dim, affine=False), nn.Linear(small.dim, 10)).eval()
    small_head.load_state_dict(prune_head(head, z, vit.dim))
    with torch.no_grad():
        assert (small_head(small(x)[0]) - logits).abs().max() < 1e-5
