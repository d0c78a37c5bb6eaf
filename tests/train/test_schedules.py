"""Stacks and schedules: every schedule runs, and layerwise freezing really freezes."""

import json

import pytest
import torch

from ssroute.errors import ConfigError
from ssroute.train.pretrain import run_pretrain
from ssroute.train.pretrain_module import PretrainModule
from ssroute.train.schedule import SchedulePlan

STACK = ["model.stack=[ssl,route,ssl]", "model.num_experts=4", "trainer.max_epochs=3"]


@pytest.mark.slow
@pytest.mark.parametrize("schedule,epochs", [("end_to_end", 3), ("layerwise", 3), ("layerwise_then_joint", 4)])
def test_each_schedule_runs_end_to_end(tmp_path, pretrain_cfg, schedule, epochs):
    run = run_pretrain(pretrain_cfg([*STACK, f"schedule={schedule}"]), tmp_path / "runs" / schedule)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == epochs and metrics["moe_layers"] == 1.0
    assert "routing_agreement" in metrics and "knn_top1" in metrics
    saved = (run / "config.yaml").read_text()
    assert "depth: 3" in saved and "moe_layers:\n  - 1" in saved


@pytest.mark.slow
def test_layerwise_freezing_keeps_earlier_stages_bit_identical(tmp_path, pretrain_cfg, monkeypatch):
    snapshots = {}

    def snapshot(self):
        snapshots[self.current_epoch] = {k: v.clone() for k, v in self.backbone.state_dict().items()}

    monkeypatch.setattr(PretrainModule, "on_train_epoch_end", snapshot, raising=False)
    overrides = [*STACK, "schedule=layerwise", "router=vq"]  # vq: its codebook's EMA must freeze too
    run = run_pretrain(pretrain_cfg(overrides), tmp_path / "runs" / "lw")
    final = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    final = {k[len("backbone."):]: v for k, v in final.items() if k.startswith("backbone.")}

    def same(prefix, snap):
        keys = [k for k in final if k.startswith(prefix)]
        assert keys
        return all(torch.equal(final[k], snap[k]) for k in keys)

    assert same("patch_embed.", snapshots[0]) and same("blocks.0.", snapshots[0])  # stage 0 frozen after epoch 0
    assert same("blocks.1.", snapshots[1])  # the routed stage frozen after epoch 1, codebook included
    assert not same("blocks.2.", snapshots[1])  # the last stage kept learning
    assert not same("blocks.1.", snapshots[0])  # ... and the routed stage did learn in its own phase
    # the final LayerNorm belongs to the last stage: untouched (at its init) through stages 0 and 1, trained in stage 2
    for epoch in (0, 1):
        assert torch.equal(snapshots[epoch]["norm.weight"], torch.ones_like(final["norm.weight"]))
        assert torch.equal(snapshots[epoch]["norm.bias"], torch.zeros_like(final["norm.bias"]))
    assert not torch.equal(final["norm.weight"], snapshots[1]["norm.weight"])


def test_schedule_plans_and_bad_values():
    assert [SchedulePlan("layerwise", 2, 3).phase(e) for e in range(6)] == [0, 0, 0, 1, 1, 1]
    assert SchedulePlan("layerwise_then_joint", 2, 3, 2).phase_bounds(6) == (6, 2)
    with pytest.raises(ConfigError, match="schedule.name='blockwise' is unknown"):
        SchedulePlan("blockwise", 2, 1)


@pytest.mark.slow
def test_bad_stacks_are_refused(tmp_path, pretrain_cfg):
    with pytest.raises(ConfigError, match=r"unknown block kinds \['moe'\]"):
        run_pretrain(pretrain_cfg(["model.stack=[ssl,moe]"]), tmp_path / "a")
    with pytest.raises(ConfigError, match="contradicts model.stack"):
        run_pretrain(pretrain_cfg(["model.stack=[ssl,route]", "model.moe_layers=[0]"]), tmp_path / "b")


def test_dense_block_kind_is_the_routed_stack_without_routing(pretrain_cfg):
    from ssroute.train.schedule import resolve_stack, stage_ranges

    routed, dense = pretrain_cfg(["model.stack=[ssl,route,ssl]", "model.ssl_layers=2"]), pretrain_cfg(["model.stack=[ssl,dense,ssl]", "model.ssl_layers=2"])
    for cfg in (routed, dense):
        resolve_stack(cfg)
    assert stage_ranges(routed.model) == stage_ranges(dense.model) == [(0, 2), (2, 3), (3, 5)]
    assert list(routed.model.moe_layers) == [2] and list(dense.model.moe_layers) == []
