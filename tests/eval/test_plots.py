import numpy as np
import pytest
import torch
from PIL import Image

from ssroute.config import AugmentConfig
from ssroute.data.views import ViewAugment
from ssroute.eval.analytics import routing_analytics
from ssroute.eval.plots import write_all_plots
from ssroute.eval.stability import StabilityResult
from ssroute.models import build_backbone

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
AUGMENT = AugmentConfig(
    crop_scale=(0.6, 1.0), crop_ratio=(0.8, 1.25), hflip=0.0, rotation=10.0, color_jitter=0.4, noise=0.05, grayscale=0.0
)
ALL = {
    "routing_maps.png",
    "view_links.png",
    "expert_usage.png",
    "co_selection.png",
    "class_expert.png",
    "block_vs_block.png",
    "stability_strength.png",
    "stability_families.png",
    "probe_accuracy.png",
}


def assert_valid_png(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape[0] > 50 and pixels.shape[1] > 50
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colours) > 8, f"{path.name} has only {len(colours)} colours"
    assert pixels.std() > 5.0, f"{path.name} is nearly one flat colour"


def fake_stability():
    # agreement falls with strength; chance stays near 1/4
    curves = {
        "block0": [(0.0, 1.0), (1.0, 0.7), (2.0, 0.5)],
        "block0/chance": [(0.0, 0.3), (1.0, 0.28), (2.0, 0.27)],
        "block1": [(0.0, 1.0), (1.0, 0.6), (2.0, 0.4)],
        "block1/chance": [(0.0, 0.26), (1.0, 0.26), (2.0, 0.25)],
    }
    metrics = {
        f"block{b}/family/{f}/routing_agreement": 0.5 + 0.1 * i - 0.1 * b for b in (0, 1) for i, f in enumerate(["crop", "flip", "colour"])
    }
    metrics |= {f"block{b}/family/{f}/routing_agreement_chance": 0.25 for b in (0, 1) for f in ["crop", "flip", "colour"]}
    return StabilityResult(metrics, curves)


@pytest.fixture
def routed(pretrain_cfg):
    torch.manual_seed(0)
    cfg = pretrain_cfg(["model.moe_layers=[0,1]", "model.num_experts=4", "model.patch_size=2", "router.k=2"])
    backbone = build_backbone(cfg, image_size=8, channels=1)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (30, 1, 8, 8), dtype=torch.uint8, generator=g)
    augment = ViewAugment(AUGMENT, 1, 8, (0.3,), (0.4,))
    return backbone, images, augment


def test_every_plot_is_a_valid_non_blank_png(routed, tmp_path):
    backbone, images, augment = routed
    labels = torch.arange(len(images)) % 3
    analytics = routing_analytics(backbone, augment.normalize(images), labels, 3)
    probes = {"block0/knn_top1": 0.4, "block1/knn_top1": 0.6, "block0/linear_top1": 0.5, "block1/linear_top1": 0.7, "knn_top1": 0.6}
    paths = write_all_plots(
        tmp_path / "plots",
        backbone=backbone,
        images_uint8=images,
        normalize=augment.normalize,
        augment=augment,
        analytics=analytics,
        stability=fake_stability(),
        probes=probes,
    )
    assert {p.name for p in paths} == ALL
    for path in paths:
        assert path.parent == tmp_path / "plots"
        assert_valid_png(path)


def test_plots_that_do_not_apply_are_skipped(routed, pretrain_cfg, tmp_path):
    backbone, images, augment = routed
    # a dense backbone: no routing plots at all, only probes
    dense = build_backbone(pretrain_cfg(["model.patch_size=2"]), image_size=8, channels=1)
    common = dict(images_uint8=images, normalize=augment.normalize, augment=augment, stability=None)
    paths = write_all_plots(
        tmp_path / "dense", backbone=dense, analytics=None, probes={"block0/knn_top1": 0.3, "block1/knn_top1": 0.5}, **common
    )
    assert [p.name for p in paths] == ["probe_accuracy.png"]
    # no labels: no class x expert; the run's augment config instead of a ViewAugment still gives view links
    analytics = routing_analytics(backbone, augment.normalize(images), None, None)
    common["augment"] = AUGMENT
    paths = write_all_plots(tmp_path / "unlabelled", backbone=backbone, analytics=analytics, probes=None, **common)
    assert {p.name for p in paths} == {"routing_maps.png", "view_links.png", "expert_usage.png", "co_selection.png", "block_vs_block.png"}
