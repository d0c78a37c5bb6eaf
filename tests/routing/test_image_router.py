"""Image-level routing: one choice per image, executed on the shared sort-and-gather path."""

from __future__ import annotations

import pytest
import torch

from ssroute.errors import ConfigError
from ssroute.experts import EXPERTS
from ssroute.layers.mlp import FeedForward
from ssroute.moe import build_moe, dense_reference, model_accounting
from ssroute.routing import build_router
from ssroute.routing.image import ImageRouter, ImageRouting

DIM, EXPERTS_, IMAGES, TOKENS = 16, 4, 6, 9


@pytest.mark.parametrize("experts", EXPERTS.names())
@pytest.mark.parametrize("k", [1, 2])
def test_every_token_of_an_image_goes_to_the_same_experts_and_matches_the_dense_reference(experts: str, k: int) -> None:
    # without noise: the choice is the top-k of the (clean) image distribution
    moe = build_moe(dim=DIM, hidden=24, num_experts=EXPERTS_, router="image", experts=experts, k=k, noise_std=0.0)
    x = torch.randn(IMAGES, TOKENS, DIM)
    out, routing = moe.forward_with_routing(x)
    assert isinstance(routing, ImageRouting) and out.shape == x.shape
    chosen = routing.expert.view(IMAGES, TOKENS, k)
    assert bool((chosen == chosen[:, :1]).all()), "tokens of one image were split across experts"
    assert bool((routing.token.view(IMAGES, TOKENS, k) == torch.arange(IMAGES * TOKENS).view(IMAGES, TOKENS, 1)).all())
    assert torch.equal(chosen[:, 0].sort(-1).values, routing.image_probs.topk(k, dim=-1).indices.sort(-1).values)
    assert torch.allclose(routing.probs.view(IMAGES, TOKENS, -1), routing.image_probs.unsqueeze(1).expand(-1, TOKENS, -1))
    assert int(routing.num_dropped) == 0
    flat = x.reshape(-1, DIM)
    assert torch.allclose(moe.execute(flat, routing), dense_reference(moe.experts, flat, routing), atol=1e-5)


def test_choice_depends_on_the_mean_token_only() -> None:
    router = ImageRouter(dim=DIM, num_experts=EXPERTS_, noise_std=0.0).eval()
    x = torch.randn(IMAGES, TOKENS, DIM)
    shuffled = x[:, torch.randperm(TOKENS)]
    a, b = router(x.reshape(-1, DIM), TOKENS), router(shuffled.reshape(-1, DIM), TOKENS)
    assert torch.allclose(a.image_probs, b.image_probs, atol=1e-6)
    expected = torch.softmax(x.mean(1) @ router.gate.weight.t(), dim=-1)
    assert torch.allclose(a.image_probs, expected, atol=1e-6)


def test_with_k1_the_weight_is_the_images_top_probability() -> None:
    router = ImageRouter(dim=DIM, num_experts=EXPERTS_).eval()
    routing = router(torch.randn(IMAGES * TOKENS, DIM), TOKENS)
    top = routing.image_probs.max(dim=-1).values.repeat_interleave(TOKENS)
    assert torch.allclose(routing.weight, top)


def test_balance_loss_is_over_images_and_is_zero_for_equal_importance() -> None:
    router = ImageRouter(dim=DIM, num_experts=2, noise_std=0.0, load_weight=0.0, importance_weight=1.0)
    with torch.no_grad():
        router.gate.weight.copy_(torch.tensor([[1.0] + [0.0] * (DIM - 1), [-1.0] + [0.0] * (DIM - 1)]))
    images = torch.zeros(2, TOKENS, DIM)
    images[0, :, 0], images[1, :, 0] = 1.0, -1.0  # mirror images: summed probabilities are equal
    assert float(router(images.reshape(-1, DIM), TOKENS).aux_loss) == pytest.approx(0.0, abs=1e-7)
    images[1, :, 0] = 1.0  # both images prefer expert 0
    assert float(router(images.reshape(-1, DIM), TOKENS).aux_loss) > 0.1


def test_accounting_matches_a_dense_ffn_with_k1() -> None:
    moe = build_moe(dim=DIM, hidden=32, num_experts=EXPERTS_, router="image", k=1)
    dense = FeedForward(DIM, 32)
    moe_flops = model_accounting(moe, tokens_per_image=TOKENS)["flops_per_token"]
    dense_flops = model_accounting(dense, tokens_per_image=TOKENS)["flops_per_token"]
    router_flops = DIM + 2 * DIM * EXPERTS_ / TOKENS
    assert moe_flops == pytest.approx(dense_flops + router_flops, rel=1e-6)


def test_k_is_checked_and_settable() -> None:
    with pytest.raises(ConfigError, match="k=5"):
        build_router("image", dim=DIM, num_experts=EXPERTS_, k=5)
    moe = build_moe(dim=DIM, hidden=8, num_experts=EXPERTS_, router="image")
    moe.set_k(3)
    _, routing = moe.forward_with_routing(torch.randn(2, TOKENS, DIM))
    assert routing.token.numel() == 2 * TOKENS * 3
