"""How alike the experts' outputs are: every expert on the same tokens, captured at each MoE layer's router."""

from __future__ import annotations

import torch

from ssroute.eval.expert_similarity import expert_similarity, moe_inputs, pairwise_similarity
from ssroute.layers.mlp import FeedForward
from ssroute.models.vit import ViT
from ssroute.moe import build_moe


def _vit(experts: str = "mlp", **options) -> ViT:
    torch.manual_seed(0)
    return ViT(image_size=8, channels=1, dim=16, depth=3, heads=2, patch_size=2,
               ffn_factory=lambda i: build_moe(dim=16, hidden=32, num_experts=4, experts=experts, **options) if i == 1 else FeedForward(16, 32))  # fmt: skip


def test_identical_experts_score_one_and_a_negated_expert_minus_one() -> None:
    moe = build_moe(dim=8, hidden=16, num_experts=3)
    with torch.no_grad():
        for weights in (moe.experts.w_in, moe.experts.b_in, moe.experts.w_out, moe.experts.b_out):
            weights[1].copy_(weights[0])
        moe.experts.w_out[2].copy_(-moe.experts.w_out[0])
        moe.experts.b_out[2].copy_(-moe.experts.b_out[0])
        moe.experts.w_in[2].copy_(moe.experts.w_in[0])
        moe.experts.b_in[2].copy_(moe.experts.b_in[0])
    cosine, cka = pairwise_similarity(moe, torch.randn(20, 8), tokens_per_image=5)
    assert torch.allclose(cosine, torch.tensor([[1.0, 1.0, -1.0], [1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]]), atol=1e-5)
    assert torch.allclose(cka, torch.ones(3, 3, dtype=torch.float64), atol=1e-6)  # CKA ignores the sign flip


def test_the_captured_rows_are_what_the_router_routed() -> None:
    vit = _vit().eval()
    images = torch.randn(6, 1, 8, 8)
    rows = moe_inputs(vit, images, batch_size=4)  # two forwards, concatenated
    with torch.no_grad():
        _, aux = vit(images)
        assert rows[1].shape == (6 * 16, 16)
        assert torch.allclose(vit.blocks[1].ffn.router(rows[1], tokens_per_group=16).probs, aux.routings[1].probs, atol=1e-6)
    assert not any(m._forward_pre_hooks for m in vit.modules())  # hooks removed


def test_metrics_for_every_expert_type_of_a_mixed_layer_and_the_mode_is_kept() -> None:
    vit = _vit("mixed", types=["mlp", "conv", "lut", "attention"]).train()
    metrics = expert_similarity(vit, torch.randn(5, 1, 8, 8), max_tokens=48)
    assert set(metrics) == {"block1/expert_output_cosine", "block1/expert_output_cka"}
    assert -1.0 <= metrics["block1/expert_output_cosine"] < 1.0 and 0.0 <= metrics["block1/expert_output_cka"] < 1.0
    assert all(m.training for m in vit.modules())
