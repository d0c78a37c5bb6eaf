"""Pretrain -> fine-tune on digits with a tiny budget, resume after a kill, and the NaN guard."""

import json

import pytest
import torch

from ssroute.data import build_data
from ssroute.errors import ConfigError
from ssroute.objectives.simclr import SimCLR
from ssroute.train.finetune import run_finetune
from ssroute.train.pretrain import run_pretrain
from ssroute.train.pretrain_module import NonFiniteLossError, PretrainModule


def backbone_state(run_dir):
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith(("backbone.", "objectives."))}


@pytest.mark.slow
def test_pretrain_then_finetune_writes_run_folders(tmp_path, pretrain_cfg, finetune_cfg):
    run = run_pretrain(pretrain_cfg(), tmp_path / "runs" / "pre")
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("knn_top1", "linear_top1", "train_time_s", "images_per_s", "params_total"):
        assert key in metrics
    assert metrics["knn_top1"] > 0.3  # well beyond chance (0.1) even in 2 epochs
    assert (run / "config.yaml").exists() and (run / "logs" / "metrics.csv").exists()
    counts = torch.bincount(build_data(pretrain_cfg().data, 0).train.labels)
    expected_labels = sum(max(1, round(0.5 * int(c))) for c in counts)
    for mode in ("linear", "full"):
        cfg = finetune_cfg([f"checkpoint={run}", f"mode={mode}", "labels_fraction=0.5", "trainer.max_epochs=8", "optim.lr=5e-3"])
        out = run_finetune(cfg, tmp_path / "runs" / f"ft_{mode}", overrides=[f"checkpoint={run}"])
        ft = json.loads((out / "metrics.json").read_text())
        assert ft["labels_fraction"] == 0.5 and ft["num_labels"] == expected_labels
        assert ft["test_top1"] > 0.12  # above chance (0.1): the head learned from the labels (40 steps)


@pytest.mark.slow
def test_routed_backbone_pretrains_and_finetunes_with_its_router_from_the_checkpoint(tmp_path, pretrain_cfg, finetune_cfg):
    run = run_pretrain(
        pretrain_cfg(["model.moe_layers=[1]", "model.num_experts=4", "router=expert_choice", "trainer.max_epochs=1"]),
        tmp_path / "runs" / "pre",
    )
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["params_total"] > metrics["params_active"] and 0 < metrics["expert_param_share"] < 1
    header = (run / "logs" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {f"block1/load_e{e}" for e in range(4)} | {"block1/dropped", "loss/router_aux", "loss/consistency"} <= set(header)
    for key in ("routing_agreement", "routing_agreement_chance", "expert_usage_entropy", "dead_experts", "block1/routing_agreement"):
        assert key in metrics
    assert metrics["routing_agreement"] > metrics["routing_agreement_chance"] and metrics["expert_usage_entropy"] > 0.5
    assert 0.5 < metrics["cka/block0_block1"] < 0.99999  # consecutive residual blocks: alike, but not the same features twice
    out = run_finetune(finetune_cfg([f"checkpoint={run}", "mode=linear", "trainer.max_epochs=1"]), tmp_path / "runs" / "ft", overrides=[])
    saved = (out / "config.yaml").read_text()
    assert "name: expert_choice" in saved and "moe_layers:\n  - 1" in saved


@pytest.mark.slow
def test_consistency_weight_zero_turns_the_loss_off(tmp_path, pretrain_cfg):
    run = run_pretrain(
        pretrain_cfg(["model.moe_layers=[1]", "model.num_experts=4", "consistency.weight=0", "trainer.max_epochs=1"]),
        tmp_path / "runs" / "pre",
    )
    header = (run / "logs" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "loss/consistency" not in header and "loss/router_aux" in header
    assert "routing_agreement" in json.loads((run / "metrics.json").read_text())


@pytest.mark.slow
def test_k_schedule_sets_k_each_step_and_bad_schedules_are_refused(tmp_path, pretrain_cfg):
    run = run_pretrain(
        pretrain_cfg(["model.moe_layers=[1]", "model.num_experts=4", "+k_schedule={name: linear, start: 3, end: 1, steps: 10}",
                      "trainer.max_epochs=1", "trainer.log_every_n_steps=1"]),
        tmp_path / "runs" / "k",
    )
    rows = (run / "logs" / "metrics.csv").read_text().splitlines()
    column = rows[0].split(",").index("k")
    ks = [float(r.split(",")[column]) for r in rows[1:] if r.split(",")[column]]
    assert ks[0] == 3.0 and ks[-1] == 1.0 and ks == sorted(ks, reverse=True)
    with pytest.raises(ConfigError, match="k=5 must be between 1 and num_experts=4"):
        run_pretrain(pretrain_cfg(["model.moe_layers=[1]", "model.num_experts=4", "+k_schedule={name: linear, start: 5, end: 1, steps: 10}"]), tmp_path / "runs" / "bad")
    with pytest.raises(ConfigError, match="router expert_choice has no k to set"):
        run_pretrain(pretrain_cfg(["model.moe_layers=[1]", "router=expert_choice", "+k_schedule={name: constant, k: 1}"]), tmp_path / "runs" / "bad2")


@pytest.mark.slow
def test_linear_mode_leaves_the_backbone_untouched(tmp_path, pretrain_cfg, finetune_cfg):
    run = run_pretrain(pretrain_cfg(["trainer.max_epochs=1", "trainer.knn_every_n_epochs=0"]), tmp_path / "runs" / "pre")
    out = run_finetune(finetune_cfg([f"checkpoint={run}", "mode=linear"]), tmp_path / "runs" / "ft", overrides=[])
    before = {k: v for k, v in backbone_state(run).items() if k.startswith("backbone.")}
    after = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(
    "overrides,kill_step",
    [
        (["ssl=simclr"], 8),
        (["ssl=byol"], 8),  # the EMA teacher must resume too
        (["model.stack=[ssl,route,ssl]", "schedule=layerwise", "trainer.max_epochs=3"], 14),  # killed inside stage 1
    ],
)
@pytest.mark.slow
def test_resume_after_a_kill_matches_the_uninterrupted_run(tmp_path, pretrain_cfg, monkeypatch, overrides, kill_step):
    straight = run_pretrain(pretrain_cfg(overrides), tmp_path / "a" / "run")

    original = PretrainModule.on_train_batch_end

    def killed(self, outputs, batch, batch_idx):
        original(self, outputs, batch, batch_idx)
        if self.global_step == kill_step:  # checkpoints every 3 steps, 11 steps per epoch: the last one is mid-epoch
            raise RuntimeError("simulated kill")

    monkeypatch.setattr(PretrainModule, "on_train_batch_end", killed)
    with pytest.raises(RuntimeError, match="simulated kill"):
        run_pretrain(pretrain_cfg(overrides), tmp_path / "b" / "run")
    monkeypatch.setattr(PretrainModule, "on_train_batch_end", original)
    assert not (tmp_path / "b" / "run" / "metrics.json").exists()
    resumed = run_pretrain(pretrain_cfg([*overrides, "resume=true"]), tmp_path / "b" / "fresh")
    assert resumed == tmp_path / "b" / "run"

    a, b = backbone_state(straight), backbone_state(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (straight, resumed))
    assert (ma["knn_top1"], ma["linear_top1"], ma["steps"]) == (mb["knn_top1"], mb["linear_top1"], mb["steps"])


@pytest.mark.slow
def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path, pretrain_cfg, monkeypatch):
    original = SimCLR.forward
    calls = {"n": 0}

    def poisoned(self, features, views, encoder):
        calls["n"] += 1
        loss = original(self, features, views, encoder)
        return loss * float("nan") if calls["n"] > 4 else loss

    monkeypatch.setattr(SimCLR, "forward", poisoned)
    run = tmp_path / "runs" / "nan"
    with pytest.raises(NonFiniteLossError, match="the loss became nan at step 4"):
        run_pretrain(pretrain_cfg(), run)
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values() if v.is_floating_point())
