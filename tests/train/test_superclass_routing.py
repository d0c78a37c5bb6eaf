"""Image routers in training: the image-level consistency loss and super-class targets in both entry points."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from ssroute.config import ConsistencyConfig, PretrainConfig
from ssroute.data.correspondence import view_matches
from ssroute.errors import ConfigError
from ssroute.models import build_backbone
from ssroute.objectives.routing_consistency import consistency_over_blocks, image_routing_consistency_loss, routing_consistency_loss
from ssroute.train.finetune import run_finetune
from ssroute.train.pretrain import run_pretrain

SUBSET = [
    "data.train_subset=256",
    "data.batch_size=64",
    "trainer.knn_every_n_epochs=0",
    "trainer.fluctuation_every_n_steps=0",
    "++evaluate=false",
    "trainer.log_every_n_steps=1",
]


def finetune_config(overrides: list[str]):
    """Fine-tuning config with a tiny budget (conftest's TINY also carries pretraining-only keys)."""
    from tests.conftest import compose_config

    tiny = ["trainer.max_epochs=1", "trainer.progress_bar=false", "model.dim=32", "model.depth=2"]
    return compose_config("finetune", [*tiny, *SUBSET, *overrides])


def test_image_routers_take_the_image_level_consistency_loss() -> None:
    torch.manual_seed(0)
    cfg = OmegaConf.structured(PretrainConfig())
    cfg.model.update({"dim": 16, "depth": 2, "heads": 2, "patch_size": 4, "moe_layers": [1], "num_experts": 4})
    cfg.router = {"name": "image"}
    vit = build_backbone(cfg, image_size=16, channels=1)
    with torch.no_grad():
        vit.blocks[1].ffn.router.gate.weight.mul_(300.0)  # confident, image-specific routing distributions
    first, second = (vit(torch.randn(6, 1, 16, 16))[1].routings[1] for _ in range(2))
    # view 2 of image 0 is shifted right out of the frame: none of image 0's patches has a partner. The
    # token-level loss would leave image 0 out; the image-level loss pairs every image with itself.
    eye = torch.eye(3).repeat(6, 1, 1)
    moved = eye.clone()
    moved[0, 0, 2] = 100.0
    centres = vit.patch_embed.centres.expand(6, -1, -1)
    matches = view_matches((eye, moved), (centres, centres), 16, 4, grid=True)
    assert not matches[0].valid[0].any() and matches[0].valid[1:].all()
    got = consistency_over_blocks(({1: first}, {1: second}), matches, [1], ConsistencyConfig())
    image_level = image_routing_consistency_loss(first.image_probs, second.image_probs, temperature=0.1)
    token_level = routing_consistency_loss(first.probs.view(6, 16, 4), second.probs.view(6, 16, 4), matches[0].partner, matches[0].valid,
                                           matches[1].partner, matches[1].valid, temperature=0.1)  # fmt: skip
    assert torch.allclose(got, image_level) and not torch.allclose(image_level, token_level, atol=1e-4)


@pytest.mark.slow
def test_pretraining_clusters_images_and_finetuning_clusters_classes(tmp_path, pretrain_cfg) -> None:
    stack = ["model.stack=[ssl,route]", "schedule=layerwise", "router=image", "model.num_experts=3", "superclass.weight=1"]
    run = run_pretrain(pretrain_cfg([*stack, *SUBSET]), tmp_path / "pre")
    logged = (run / "logs" / "metrics.csv").read_text().splitlines()
    header = logged[0].split(",")
    assert {"loss/superclass", "superclass_top1", "loss/consistency"} <= set(header)
    ce = [row.split(",")[header.index("loss/superclass")] for row in logged[1:]]
    assert any(value for value in ce)  # logged in the routing stage
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    clusters = state["superclass.target_of"]
    assert int(state["superclass.epoch"]) == 1 and clusters.shape == (256,) and set(clusters.tolist()) <= {0, 1, 2}

    out = run_finetune(finetune_config([f"checkpoint={run}", "superclass.weight=1", "trainer.max_epochs=8"]), tmp_path / "ft", overrides=[])
    rows = (out / "logs" / "metrics.csv").read_text().splitlines()
    column = rows[0].split(",").index("superclass_top1")
    accuracy = [float(r.split(",")[column]) for r in rows[1:] if r.split(",")[column]]
    assert accuracy[-1] > 0.6 and accuracy[-1] > accuracy[0]  # the image router learns the super-classes (chance 1/3)
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    groups = state["superclass.target_of"]
    assert groups.shape == (10,) and bool((groups >= 0).all() and (groups < 3).all()) and len(set(groups.tolist())) == 3
    assert "loss/superclass" in (out / "logs" / "metrics.csv").read_text().splitlines()[0]


@pytest.mark.slow
def test_superclass_needs_an_image_router_and_trained_features(tmp_path, pretrain_cfg) -> None:
    with pytest.raises(ConfigError, match="needs an image-routed MoE layer"):
        run_pretrain(pretrain_cfg(["model.moe_layers=[1]", "superclass.weight=1", *SUBSET]), tmp_path / "pre")
    with pytest.raises(ConfigError, match="pass checkpoint=RUN or superclass.checkpoint=RUN"):
        run_finetune(finetune_config(["model.moe_layers=[1]", "router=image", "superclass.weight=1"]), tmp_path / "ft", overrides=[])
