"""Image routers in training: the image-level consistency loss and super-class targets in both entry points."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from ssroute.config import ConsistencyConfig, PretrainConfig
from ssroute.errors import ConfigError
from ssroute.layers.moe import record_routing
from ssroute.models import build_backbone
from ssroute.objectives.routing_consistency import image_routing_consistency_loss
from ssroute.train.finetune import run_finetune
from ssroute.train.pretrain import run_pretrain
from ssroute.train.routing import consistency_loss, consistent_layers, view_matches

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
    assert consistent_layers(vit) == ["blocks.1.ffn"]  # no longer skipped
    views = [torch.randn(6, 1, 16, 16), torch.randn(6, 1, 16, 16)]
    with record_routing(vit) as recorded:
        for view in views:
            vit(view)
    eye = torch.eye(3).expand(6, 3, 3)
    matches = view_matches(vit.patch_embed, eye, eye)
    got = consistency_loss(recorded, ["blocks.1.ffn"], matches, 6, ConsistencyConfig())
    first, second = recorded["blocks.1.ffn"]
    assert torch.allclose(got, image_routing_consistency_loss(first.image_probs, second.image_probs, temperature=0.1))


def test_pretraining_clusters_images_and_finetuning_clusters_classes(tmp_path, pretrain_cfg) -> None:
    stack = ["model.stack=[ssl,route]", "schedule=layerwise", "router=image", "model.num_experts=3", "superclass.weight=1"]
    run = run_pretrain(pretrain_cfg([*stack, *SUBSET]), tmp_path / "pre")
    logged = (run / "logs" / "metrics.csv").read_text().splitlines()
    header = logged[0].split(",")
    assert {"superclass_ce", "superclass_top1", "routing_consistency"} <= set(header)
    ce = [row.split(",")[header.index("superclass_ce")] for row in logged[1:]]
    assert any(value for value in ce)  # logged in the routing stage
    clusters = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["callbacks"]
    (state,) = [s for key, s in clusters.items() if "SuperclassClusters" in key]
    assert state["epoch"] == 1 and state["cluster_of"].shape == (256,) and set(state["cluster_of"].tolist()) <= {0, 1, 2}

    out = run_finetune(finetune_config([f"checkpoint={run}", "superclass.weight=1"]), tmp_path / "ft", overrides=[])
    assert 0.0 <= json.loads((out / "metrics.json").read_text())["test_top1"] <= 1.0
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    groups = state["superclass_of"]
    assert groups.shape == (10,) and bool((groups >= 0).all() and (groups < 3).all()) and len(set(groups.tolist())) == 3
    assert "superclass_ce" in (out / "logs" / "metrics.csv").read_text().splitlines()[0]


def test_superclass_needs_an_image_router_and_trained_features(tmp_path, pretrain_cfg) -> None:
    with pytest.raises(ConfigError, match="needs an image-routed MoE layer"):
        run_pretrain(pretrain_cfg(["model.moe_layers=[1]", "superclass.weight=1", *SUBSET]), tmp_path / "pre")
    with pytest.raises(ConfigError, match="pass checkpoint=RUN or superclass.checkpoint=RUN"):
        run_finetune(finetune_config(["model.moe_layers=[1]", "router=image", "superclass.weight=1"]), tmp_path / "ft", overrides=[])
