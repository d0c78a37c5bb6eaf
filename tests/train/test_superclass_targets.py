"""Super-class targets in training: which routers they reach, the step's loss, and the features clustered."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from ssroute.errors import ConfigError
from ssroute.layers.mlp import FeedForward
from ssroute.models.vit import ViT
from ssroute.moe import build_moe
from ssroute.train.superclass_targets import SuperclassTargets, image_blocks, pooled_features


def vit(routers: dict[int, str]) -> ViT:
    factory = lambda i: build_moe(dim=8, hidden=8, num_experts=2, router=routers[i]) if i in routers else FeedForward(8, 8)  # noqa: E731
    return ViT(image_size=8, channels=1, dim=8, depth=3, heads=2, patch_size=2, ffn_factory=factory)


class Logged:
    def __init__(self) -> None:
        self.logged: dict[str, float] = {}

    def log(self, key, value) -> None:
        self.logged[key] = float(value)


def test_targets_reach_every_image_router_and_only_those() -> None:
    model = vit({0: "image", 1: "token_choice"})
    assert image_blocks(model) == [0]
    cfg = OmegaConf.create({"superclass": {"weight": 1.0}})
    assert SuperclassTargets.check(cfg, model)
    targets = SuperclassTargets(0.5, num_experts=2, size=10, by_class=False)
    targets.target_of.copy_(torch.arange(10) % 2)
    _, aux = model(torch.randn(3, 1, 8, 8))
    module = Logged()
    keys = torch.tensor([4, 7, 2])
    losses = targets.losses(module, [aux], keys)
    expected = 0.5 * torch.nn.functional.nll_loss(aux.routings[0].image_probs.log(), keys % 2)
    assert set(losses) == {"superclass"} and torch.allclose(losses["superclass"], expected, atol=1e-6)
    assert "superclass_top1" in module.logged
    assert targets.losses(module, [aux], keys, first_block=1) == {}  # the image router is frozen below block 1
    with pytest.raises(ConfigError, match="needs an image-routed MoE layer; set router=image"):
        SuperclassTargets.check(cfg, vit({1: "token_choice"}))
    assert not SuperclassTargets.check(OmegaConf.create({"superclass": {"weight": 0.0}}), model)


def test_pooled_features_capture_what_the_router_pools() -> None:
    torch.manual_seed(0)
    model = vit({1: "image"})
    images = torch.randn(10, 1, 8, 8)
    loader = [
        (images[:6], torch.zeros(6, dtype=torch.long), torch.arange(6)),
        (images[6:], torch.ones(4, dtype=torch.long), torch.arange(6, 10)),
    ]
    found = pooled_features(model, loader, lambda x: x, torch.device("cpu"), block=1)
    with torch.no_grad():  # what the MoE layer of block 1 receives: norm2 of the tokens after block 1's attention
        block = model.eval().blocks[1]
        x = model(images, keep_blocks=True)[1].block_tokens[0]
        x = x + block.attn(block.norm1(x))
        expected = block.norm2(x).mean(dim=1)
    model.train()
    assert torch.allclose(found["features"], expected, atol=1e-6)
    logits = expected @ model.blocks[1].ffn.router.gate.weight.t()
    assert torch.equal(found["router_top1"], logits.argmax(-1)) and torch.equal(found["index"], torch.arange(10))
    assert model.training  # restored after the eval-mode pass
