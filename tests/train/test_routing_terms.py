"""The routing-consistency loss inside a real MoE ViT: it trains the router towards agreement."""

import torch
from omegaconf import OmegaConf

from ssroute.config import AugmentConfig, ConsistencyConfig, PretrainConfig
from ssroute.data.views import ViewAugment
from ssroute.eval.routing_stability import RoutingStabilityMeter
from ssroute.layers.moe import record_routing
from ssroute.models import build_backbone
from ssroute.train.routing import consistency_loss, consistent_layers, measure_stability, view_matches


def routed_vit(router="token_choice"):
    cfg = OmegaConf.structured(PretrainConfig())
    cfg.model.update({"dim": 32, "depth": 2, "heads": 2, "patch_size": 4, "moe_layers": [1], "num_experts": 4})
    cfg.router = {"name": router}
    return build_backbone(cfg, image_size=16, channels=1)


def agreement(vit, views, matches, batch):
    meter = RoutingStabilityMeter(4)
    with torch.no_grad(), record_routing(vit) as recorded:
        for view in views.images:
            vit(view)
    measure_stability(meter, recorded, matches, batch)
    return meter.compute()["routing_agreement"]


def test_minimising_the_consistency_loss_raises_agreement_of_corresponding_patches():
    torch.manual_seed(0)
    vit = routed_vit()
    augment = ViewAugment(AugmentConfig(crop_scale=(0.5, 1.0), hflip=0.5, color_jitter=0.0), 1, 16, (0.5,), (0.25,))
    images = torch.randint(0, 255, (32, 1, 16, 16), dtype=torch.uint8)
    views = augment(images, num_views=2)
    matches = view_matches(vit.patch_embed, views.matrices[0], views.matrices[1])
    assert matches[0].valid.float().mean() > 0.3
    layers = consistent_layers(vit)
    before = agreement(vit, views, matches, 32)
    optimizer = torch.optim.Adam(vit.parameters(), lr=3e-3)
    cfg = ConsistencyConfig()
    for _ in range(40):
        with record_routing(vit) as recorded:
            for view in views.images:
                vit(view)
        loss = consistency_loss(recorded, layers, matches, 32, cfg)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = agreement(vit, views, matches, 32)
    assert after > before + 0.2, (before, after)


def test_routers_without_learned_distributions_are_skipped(caplog):
    caplog.set_level("INFO")
    assert consistent_layers(routed_vit("hash")) == []
    assert "skips blocks.1.ffn" in caplog.text
    assert consistent_layers(routed_vit("vq")) == ["blocks.1.ffn"]
