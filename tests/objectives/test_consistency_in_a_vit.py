"""The routing-consistency loss inside a real MoE ViT: it trains the router towards agreement."""

import torch
from omegaconf import OmegaConf

from ssroute.config import AugmentConfig, ConsistencyConfig, PretrainConfig
from ssroute.data.correspondence import matches_of
from ssroute.data.views import ViewAugment
from ssroute.eval.agreement import RoutingAgreementMeter
from ssroute.models import build_backbone
from ssroute.objectives.routing_consistency import consistency_over_blocks


def routed_vit(router="token_choice"):
    cfg = OmegaConf.structured(PretrainConfig())
    cfg.model.update({"dim": 32, "depth": 2, "heads": 2, "patch_size": 4, "moe_layers": [1], "num_experts": 4})
    cfg.router = {"name": router}
    return build_backbone(cfg, image_size=16, channels=1)


def agreement(vit, views, matches):
    meter = RoutingAgreementMeter(4)
    with torch.no_grad():
        auxes = [vit(view)[1] for view in views.images]
    meter.update(1, auxes[0].routings[1], auxes[1].routings[1], matches[0].partner, matches[0].valid)
    return meter.compute()["routing_agreement"]


def test_minimising_the_consistency_loss_raises_agreement_of_corresponding_patches():
    torch.manual_seed(0)
    vit = routed_vit()
    augment = ViewAugment(AugmentConfig(crop_scale=(0.5, 1.0), hflip=0.5, color_jitter=0.0), 1, 16, (0.5,), (0.25,))
    images = torch.randint(0, 255, (32, 1, 16, 16), dtype=torch.uint8)
    views = augment(images, num_views=2)
    auxes = [vit(view)[1] for view in views.images]
    matches = matches_of(views, [a.patches for a in auxes], vit.patch_embed)
    assert matches[0].valid.float().mean() > 0.3
    before = agreement(vit, views, matches)
    optimizer = torch.optim.Adam(vit.parameters(), lr=3e-3)
    cfg = ConsistencyConfig()
    for _ in range(40):
        auxes = [vit(view)[1] for view in views.images]
        loss = consistency_over_blocks((auxes[0].routings, auxes[1].routings), matches, [1], cfg)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = agreement(vit, views, matches)
    assert after > before + 0.2, (before, after)


def test_routers_without_learned_distributions_are_skipped(tmp_path, pretrain_cfg, caplog):
    from ssroute.train.pretrain_module import PretrainModule

    caplog.set_level("INFO")
    from ssroute.data import build_data

    for router, expected in (("hash", []), ("vq", [1])):
        cfg = pretrain_cfg(["model.moe_layers=[1]", "model.num_experts=4", f"router={router}", "model.patch_size=2", "trainer.max_epochs=1"])
        module = PretrainModule(cfg, build_data(cfg.data, 0))
        assert module.consistent_blocks == expected
    assert "skips block(s) [1]" in caplog.text
