import math
from dataclasses import replace

import pytest
import torch
from omegaconf import OmegaConf

from ssroute.config import AugmentConfig
from ssroute.data.views import ViewAugment
from ssroute.errors import ConfigError
from ssroute.eval.agreement import RoutingAgreementMeter, js_divergence
from ssroute.eval.stability import (
    IDENTITY,
    REFERENCE,
    as_augment_config,
    augmentation_stability,
    family_only,
    normalisation_of,
    scale_augment,
)
from ssroute.models import build_backbone
from ssroute.routing import Router, build_router
from ssroute.routing.base import sparse_routing
from ssroute.routing.image import ImageRouting

MOE = ["model.moe_layers=[0,1]", "model.num_experts=4", "model.patch_size=2"]
DIGITS_AUGMENT = AugmentConfig(
    crop_scale=(0.6, 1.0), crop_ratio=(0.8, 1.25), hflip=0.0, rotation=10.0, color_jitter=0.4, noise=0.05, grayscale=0.0
)
MEAN, STD = (0.3,), (0.4,)


@pytest.fixture
def backbone(pretrain_cfg):
    torch.manual_seed(0)
    return build_backbone(pretrain_cfg(MOE), image_size=8, channels=1)


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (24, 1, 8, 8), dtype=torch.uint8, generator=g)


def normalize(images):
    return ViewAugment(IDENTITY, 1, 8, MEAN, STD).normalize(images)


def test_js_divergence_hand_computed():
    p, q = torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5])
    # m = (0.75, 0.25): H(m) = 0.811278 bits, H(p) = 0, H(q) = 1  ->  JS = 0.811278 - 0.5
    expected = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25)) - 0.5
    assert js_divergence(p, q).item() == pytest.approx(expected, abs=1e-9)
    assert js_divergence(q, p).item() == pytest.approx(expected, abs=1e-9)
    batch = torch.softmax(torch.randn(3, 5, 4), dim=-1)
    assert torch.allclose(js_divergence(batch, batch), torch.zeros(3, 5, dtype=torch.float64))
    assert js_divergence(torch.eye(4), torch.eye(4).roll(1, dims=0)).tolist() == [1.0] * 4  # disjoint supports: 1 bit


def top_k_routing(probs, k=2):
    """``[images, tokens, E]`` distributions -> a routing executing each token's top-k experts with those weights."""
    flat = probs.reshape(-1, probs.shape[-1])
    top = flat.topk(k, dim=-1)
    token = torch.arange(flat.shape[0]).repeat_interleave(k)
    return sparse_routing(flat, token, top.indices.reshape(-1), top.values.reshape(-1), tokens_per_group=probs.shape[1])


def test_identical_routings_agree_with_zero_js():
    router = build_router("token_choice", dim=8, num_experts=4, k=2, capacity_factor=None).eval()
    x = torch.randn(6 * 16, 8)
    meter = RoutingAgreementMeter(4)
    meter.update(3, router(x, 16), router(x, 16), torch.arange(16).expand(6, 16), torch.ones(6, 16, dtype=torch.bool))
    stats = meter.compute()
    assert stats["block3/routing_agreement"] == 1.0
    assert stats["block3/routing_js"] == pytest.approx(0.0, abs=1e-12)


def test_independent_soft_routings_agree_at_chance():
    g = torch.Generator().manual_seed(0)
    b, n, e, rounds = 8, 49, 4, 50
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])  # unequal usage, so chance is not 1/E
    meter = RoutingAgreementMeter(e)
    partner, valid = torch.arange(n).expand(b, n), torch.ones(b, n, dtype=torch.bool)
    for _ in range(rounds):
        p1 = torch.softmax(logits + 2 * torch.randn(b, n, e, generator=g), dim=-1)
        p2 = torch.softmax(logits + 2 * torch.randn(b, n, e, generator=g), dim=-1)
        meter.update(0, top_k_routing(p1), top_k_routing(p2), partner, valid)
    stats = meter.compute()
    # agreement is a mean of b*n*rounds independent Bernoulli(chance) draws: 4 standard errors ~ 0.013
    tolerance = 4 * math.sqrt(stats["routing_agreement_chance"] * (1 - stats["routing_agreement_chance"]) / (b * n * rounds))
    assert stats["routing_agreement"] == pytest.approx(stats["routing_agreement_chance"], abs=tolerance)
    assert stats["routing_agreement_chance"] > 0.3  # well above 1/E: the usage is skewed
    assert stats["routing_js"] > 0.05  # independent distributions differ below top-1 too


def test_scale_augment_interpolates_from_identity():
    assert scale_augment(DIGITS_AUGMENT, 0.0) == replace(IDENTITY, color_jitter_p=DIGITS_AUGMENT.color_jitter_p)
    assert scale_augment(DIGITS_AUGMENT, 1.0) == replace(DIGITS_AUGMENT, crop_ratio=(0.8, 1.25))
    strong = scale_augment(DIGITS_AUGMENT, 2.0)
    assert strong.crop_scale == pytest.approx((0.2, 1.0)) and strong.rotation == 20.0 and strong.noise == pytest.approx(0.1)
    assert strong.color_jitter == 0.8 and scale_augment(DIGITS_AUGMENT, 3.0).color_jitter == 1.0
    assert scale_augment(DIGITS_AUGMENT, 10.0).crop_scale[0] == 0.05  # crops never shrink to nothing
    with pytest.raises(ConfigError, match="strength"):
        scale_augment(DIGITS_AUGMENT, -0.5)


def test_family_only_keeps_one_family_and_falls_back_to_the_reference():
    crop, in_run = family_only(DIGITS_AUGMENT, "crop")
    assert in_run and crop == replace(IDENTITY, crop_scale=(0.6, 1.0), crop_ratio=(0.8, 1.25))
    flip, in_run = family_only(DIGITS_AUGMENT, "flip")  # digits train without flips
    assert not in_run and flip == replace(IDENTITY, hflip=REFERENCE.hflip)
    blur_noise, in_run = family_only(DIGITS_AUGMENT, "blur_noise")
    assert in_run and blur_noise == replace(IDENTITY, noise=0.05)


def test_normalisation_is_read_off_the_normaliser():
    mean, std = normalisation_of(ViewAugment(IDENTITY, 3, 8, (0.1, 0.2, 0.3), (0.5, 0.6, 0.7)).normalize, channels=3)
    assert mean == pytest.approx((0.1, 0.2, 0.3)) and std == pytest.approx((0.5, 0.6, 0.7))


def test_stability_of_a_deterministic_router(backbone, images):
    backbone.train()
    result = augmentation_stability(
        backbone, OmegaConf.structured(DIGITS_AUGMENT), normalize, images, pairs=1, strengths=[2.0, 0.0, 1.0], seed=3
    )
    m = result.metrics
    assert backbone.training  # the mode is restored
    for block in ("block0", "block1"):
        # no augmentation: both views are the image itself, so routing agrees exactly
        assert m[f"{block}/strength/0/routing_agreement"] == 1.0
        assert m[f"{block}/strength/0/routing_js"] == pytest.approx(0.0, abs=1e-9)
        assert m[f"{block}/strength/2/routing_agreement"] < 1.0
        for family in ("crop", "flip", "rotation", "colour", "blur_noise"):  # every family changes some decisions, none all of them
            agreement = m[f"{block}/family/{family}/routing_agreement"]
            assert m[f"{block}/family/{family}/routing_agreement_chance"] < agreement < 1.0, (family, agreement)
        assert [s for s, _ in result.curves[block]] == [0.0, 1.0, 2.0]
        assert [s for s, _ in result.curves[f"{block}/chance"]] == [0.0, 1.0, 2.0]
        assert result.curves[block][1][1] == m[f"{block}/strength/1/routing_agreement"]
    assert m["family/flip/in_run"] == 0.0 and m["family/crop/in_run"] == 1.0
    assert m["routing_agreement"] == pytest.approx((m["block0/routing_agreement"] + m["block1/routing_agreement"]) / 2)
    # seeded: the same call gives the same numbers, and the caller's RNG stream is untouched
    torch.manual_seed(7)
    again = augmentation_stability(backbone, DIGITS_AUGMENT, normalize, images, pairs=1, strengths=[2.0, 0.0, 1.0], seed=3)
    after = torch.rand(1)
    torch.manual_seed(7)
    assert again.metrics == m and torch.equal(after, torch.rand(1))


class MeanImageRouter(Router):
    """Routes every token of an image to the expert of the image's mean token (an image-level router)."""

    per_token = False

    def __init__(self, dim, num_experts):
        super().__init__(dim, num_experts)
        self.proj = torch.nn.Linear(dim, num_experts)

    def forward(self, tokens, tokens_per_group=None):
        n = self.group_size(tokens, tokens_per_group)
        probs = torch.softmax(self.proj(tokens.view(-1, n, self.dim).mean(dim=1)), dim=-1)  # [images, experts]
        per_token = probs.repeat_interleave(n, dim=0)
        expert = per_token.argmax(dim=-1)
        base = sparse_routing(per_token, torch.arange(tokens.shape[0]), expert, torch.ones(tokens.shape[0]), n)
        return ImageRouting(**{f: getattr(base, f) for f in base.__dataclass_fields__}, image_probs=probs)


def test_image_routers_get_image_level_agreement(backbone, images):
    backbone.blocks[1].ffn.router = MeanImageRouter(backbone.dim, 4)
    result = augmentation_stability(backbone, DIGITS_AUGMENT, normalize, images, pairs=1, strengths=[0.0], seed=0)
    m = result.metrics
    assert m["block1/strength/0/routing_agreement"] == 1.0
    # one decision per image: agreement is a multiple of 1 / (images * pairs)
    assert (m["block1/routing_agreement"] * len(images)) == pytest.approx(round(m["block1/routing_agreement"] * len(images)))


def test_bad_input_is_a_config_error(pretrain_cfg, backbone, images):
    dense = build_backbone(pretrain_cfg(["model.patch_size=2"]), image_size=8, channels=1)
    with pytest.raises(ConfigError, match="no MoE layer"):
        augmentation_stability(dense, DIGITS_AUGMENT, normalize, images, pairs=1, strengths=[0.0], seed=0)
    with pytest.raises(ConfigError, match="unknown keys"):
        as_augment_config({"crop": 1.0})
    with pytest.raises(ConfigError, match="uint8"):
        augmentation_stability(backbone, DIGITS_AUGMENT, normalize, images.float(), pairs=1, strengths=[0.0], seed=0)


def test_views_are_routed_in_their_own_forwards_when_groups_hold_several_images(pretrain_cfg, images):
    """Routing groups of several images never mix the two views: without augmentation agreement is exact."""
    torch.manual_seed(0)
    grouped = build_backbone(pretrain_cfg([*MOE, "model.group_images=4"]), image_size=8, channels=1)
    few = images[:6]  # 6 images: two views in one forward would make groups of 4 that straddle the views
    result = augmentation_stability(grouped, OmegaConf.structured(DIGITS_AUGMENT), normalize, few, pairs=1, strengths=[0.0], seed=0)
    assert result.metrics["block0/strength/0/routing_agreement"] == 1.0
