"""``python -m ssroute.prune``: bad input in one sentence; dense, routed and unlabelled runs; resume; fine-tuning the result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ssroute.errors import ConfigError
from ssroute.models import build_backbone
from ssroute.prune.module import PruneModule
from ssroute.prune.run import run_prune
from tests.conftest import compose_config

PRUNE_TINY = ["trainer.max_epochs=2", "trainer.progress_bar=false", "trainer.checkpoint_every_n_steps=3", "data.batch_size=128",
              "speed_images=64", "evaluation.block_linear=false", "sparsity_warmup_epochs=0.5", "reg_learning_rate=0.1"]  # fmt: skip


def fake_run(folder: Path, finetune_cfg, overrides=(), head: bool = True) -> Path:
    """A run folder with a random-weight ViT (and a classification head): what pruning reads, without training one."""
    cfg = finetune_cfg(list(overrides))
    cfg.model.patch_size = 2
    torch.manual_seed(0)
    backbone = build_backbone(cfg, 8, 1)
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    if head:
        state.update({"head.0.running_mean": torch.zeros(cfg.model.dim), "head.0.running_var": torch.ones(cfg.model.dim),
                      "head.0.num_batches_tracked": torch.tensor(0), "head.1.weight": torch.randn(10, cfg.model.dim) * 0.1,
                      "head.1.bias": torch.zeros(10)})  # fmt: skip
    (folder / "checkpoints").mkdir(parents=True)
    torch.save(
        {"hyper_parameters": {"config": OmegaConf.to_container(cfg, resolve=True)}, "state_dict": state},
        folder / "checkpoints" / "last.ckpt",
    )
    return folder


def prune_cfg(overrides):
    return compose_config("prune", [*PRUNE_TINY, *overrides])


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["target_sparsity=1.0"], r"target_sparsity=1.0 must be in \[0, 1\)"),
        (["target_sparsity=-0.1"], r"target_sparsity=-0.1 must be in \[0, 1\)"),
        (["distill=logits", "teacher=null"], r"distill=logits needs a teacher but teacher is null"),
        (["distill=layerwize"], r"distill='layerwize' is not valid; choose none, logits or layerwise"),
        (["layer_loss=l1"], r"layer_loss='l1' is not a distillation loss; choose mse or kl"),
    ],
)
def test_bad_settings_are_one_sentence_before_loading(tmp_path, overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        run_prune(prune_cfg(["checkpoint=does/not/matter", *overrides]), tmp_path / "runs" / "prune" / "x", overrides)


def test_checkpoint_from_another_architecture_is_one_sentence(tmp_path, finetune_cfg) -> None:
    run = fake_run(tmp_path / "depth", finetune_cfg)
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    checkpoint["hyper_parameters"]["config"]["model"]["name"] = "vit_depth"
    torch.save(checkpoint, run / "checkpoints" / "last.ckpt")
    with pytest.raises(ConfigError, match=r"is a model=vit_depth run; structured pruning supports model=vit backbones only"):
        run_prune(prune_cfg([f"checkpoint={run}"]), tmp_path / "runs" / "prune" / "x", [])
    with pytest.raises(ConfigError, match=r"structures lists experts, which this model cannot prune"):
        run_prune(
            prune_cfg([f"checkpoint={fake_run(tmp_path / 'dense', finetune_cfg)}", "structures=[experts]"]),
            tmp_path / "runs" / "prune" / "y",
            [],
        )


@pytest.mark.slow
def test_prune_a_dense_classifier_then_finetune_it(tmp_path, finetune_cfg) -> None:
    from ssroute.train.finetune import run_finetune

    source = fake_run(tmp_path / "dense", finetune_cfg)
    run = run_prune(prune_cfg([f"checkpoint={source}", "target_sparsity=0.5"]), tmp_path / "runs" / "prune" / "a", [])
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("test_top1", "test_top1_before", "sparsity", "params_before", "params_after", "images_per_s", "images_per_s_before"):
        assert key in metrics, key
    assert metrics["params_after"] < metrics["params_before"] and metrics["sparsity"] > 0
    assert metrics["surgery_max_abs_diff"] < 1e-5 and metrics["surgery_max_abs_diff_logits"] < 1e-5
    assert (run / "report.md").is_file() and (run / "plots" / "sparsity_per_block.png").is_file() and (run / "config.yaml").is_file()
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert set(saved["prune"]["log_alpha"]) == set(saved["prune"]["gates"])
    out = run_finetune(finetune_cfg([f"checkpoint={run}", "trainer.max_epochs=1"]), tmp_path / "runs" / "ft", overrides=[])
    assert json.loads((out / "metrics.json").read_text())["params_total"] == metrics["params_after"]


@pytest.mark.slow
def test_prune_a_routed_pretrained_model_by_distilling_its_features(tmp_path, finetune_cfg) -> None:
    source = fake_run(tmp_path / "routed", finetune_cfg, ["model.moe_layers=[1]", "model.num_experts=4", "router.k=2"], head=False)
    run = run_prune(prune_cfg([f"checkpoint={source}", "target_sparsity=0.4", "output_loss=mse"]), tmp_path / "runs" / "prune" / "b", [])
    metrics = json.loads((run / "metrics.json").read_text())
    assert "test_top1" not in metrics and {"knn_top1", "knn_top1_before", "linear_top1"} <= set(metrics)
    assert "experts" in metrics["structures"] and metrics["surgery_max_abs_diff"] < 1e-4


@pytest.mark.slow
def test_a_killed_prune_run_resumes_with_identical_masks(tmp_path, finetune_cfg, monkeypatch) -> None:
    source = fake_run(tmp_path / "dense", finetune_cfg)
    overrides = [f"checkpoint={source}", "distill=logits"]
    straight = run_prune(prune_cfg(overrides), tmp_path / "a" / "run", [])
    original = PruneModule.on_train_batch_end

    def killed(self, outputs, batch, batch_idx):
        original(self, outputs, batch, batch_idx)
        if self.global_step == 7:  # checkpoints every 3 steps: the last one is at step 6
            raise RuntimeError("simulated kill")

    monkeypatch.setattr(PruneModule, "on_train_batch_end", killed)
    with pytest.raises(RuntimeError, match="simulated kill"):
        run_prune(prune_cfg(overrides), tmp_path / "b" / "run", [])
    monkeypatch.setattr(PruneModule, "on_train_batch_end", original)
    resumed = run_prune(prune_cfg([*overrides, "resume=true"]), tmp_path / "b" / "fresh", [])
    assert resumed == tmp_path / "b" / "run"
    a, b = (torch.load(r / "checkpoints" / "last.ckpt", weights_only=False)["prune"] for r in (straight, resumed))
    assert a["log_alpha"].keys() == b["log_alpha"].keys()
    assert all(torch.equal(a["log_alpha"][k], b["log_alpha"][k]) for k in a["log_alpha"])
    assert all(torch.equal(a["gates"][k], b["gates"][k]) for k in a["gates"])
