"""The training callbacks: routing-fluctuation snapshots (resumable, written atomically) and the online monitor."""

import json

import pytest
import torch

from ssroute.eval.fluctuation import fluctuation_metrics
from ssroute.train.callbacks import OnlineMonitor, RoutingFluctuation
from ssroute.train.pretrain import run_pretrain
from ssroute.train.pretrain_module import PretrainModule
from ssroute.train.run import build_trainer

TINY_MOE = [
    "model.moe_layers=[1]",
    "model.num_experts=4",
    "data.train_subset=512",  # 4 steps of 128 per epoch
    "trainer.max_epochs=3",
    "trainer.knn_every_n_epochs=0",
    "trainer.fluctuation_every_n_steps=5",
    "consistency.weight=0",  # the callback does not need the loss; keeps the runs quick
]


_RUNS: dict = {}  # one uninterrupted run shared by the tests below (pretrain_cfg is function-scoped)


@pytest.fixture
def straight_run(tmp_path_factory, pretrain_cfg):
    if "straight" not in _RUNS:
        _RUNS["straight"] = run_pretrain(pretrain_cfg(TINY_MOE), tmp_path_factory.mktemp("flu") / "run")
    return _RUNS["straight"]


@pytest.mark.slow
def test_callback_records_a_snapshot_every_n_steps_and_at_both_ends(straight_run):
    history = torch.load(straight_run / "routing_history.pt", weights_only=True)
    assert history["steps"].tolist() == [0, 5, 10, 12]  # 12 steps: start, every 5, end
    experts = history["experts"]["blocks.1.ffn"]
    assert experts.shape == (4, 256 * 16) and history["probe_split"] == "test" and history["tokens_per_image"] == 16
    # the last snapshot is the trained model's top-1 routing of the probe images: recompute it from the checkpoint
    from omegaconf import OmegaConf

    from ssroute.checkpoint import load_backbone
    from ssroute.data import build_data
    from ssroute.data.views import ViewAugment
    from ssroute.eval.fluctuation import top1_experts

    cfg = OmegaConf.load(straight_run / "config.yaml")
    data = build_data(cfg.data, cfg.seed)
    backbone, _, _ = load_backbone(str(straight_run), data)
    normalize = ViewAugment(cfg.data.augment, data.channels, data.image_size, data.mean, data.std).normalize
    with torch.no_grad():
        _, aux = backbone(normalize(data.test.images[:256]))
    assert torch.equal(experts[-1].long(), top1_experts(aux.routings[1]))
    metrics = json.loads((straight_run / "metrics.json").read_text())
    assert "linear_top1" in metrics  # trainer.knn_every_n_epochs=0 must not skip the final evaluation
    expected = fluctuation_metrics(history["experts"], history["steps"])
    assert {k: metrics[k] for k in expected} == expected
    assert {"routing_fluctuation", "block1/routing_fluctuation", "block1/routing_last_change_step_mean"} <= expected.keys()


@pytest.mark.slow
def test_callback_state_lives_in_the_checkpoint_and_round_trips(straight_run):
    checkpoint = torch.load(straight_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    state = checkpoint["callbacks"]["RoutingFluctuation"]
    assert state["steps"].tolist() == [0, 5, 10, 12]
    restored = RoutingFluctuation(every_n_steps=5)
    restored.load_state_dict(state)
    again = restored.state_dict()
    assert torch.equal(again["steps"], state["steps"]) and torch.equal(again["experts"]["blocks.1.ffn"], state["experts"]["blocks.1.ffn"])
    assert (again["probe_images"], again["tokens_per_image"]) == (256, 16)
    assert restored.metrics() == fluctuation_metrics(state["experts"], state["steps"])


@pytest.mark.slow
def test_killed_and_resumed_run_ends_with_the_same_history(straight_run, tmp_path, pretrain_cfg, monkeypatch):
    original = PretrainModule.on_train_batch_end

    def killed(self, outputs, batch, batch_idx):
        original(self, outputs, batch, batch_idx)
        if self.global_step == 8:  # last checkpoint at step 6 (every 3): snapshots 0 and 5 are in it, 10 is redone
            raise RuntimeError("simulated kill")

    monkeypatch.setattr(PretrainModule, "on_train_batch_end", killed)
    with pytest.raises(RuntimeError, match="simulated kill"):
        run_pretrain(pretrain_cfg(TINY_MOE), tmp_path / "run")
    monkeypatch.setattr(PretrainModule, "on_train_batch_end", original)
    assert not (tmp_path / "run" / "routing_history.pt").exists()
    resumed = run_pretrain(pretrain_cfg([*TINY_MOE, "resume=true"]), tmp_path / "fresh")
    a, b = (torch.load(run / "routing_history.pt", weights_only=True) for run in (straight_run, resumed))
    assert torch.equal(a["steps"], b["steps"]) and torch.equal(a["experts"]["blocks.1.ffn"], b["experts"]["blocks.1.ffn"])


@pytest.mark.parametrize(
    "overrides,attached",
    [([], False), (["model.moe_layers=[1]"], True), (["model.moe_layers=[1]", "trainer.fluctuation_every_n_steps=0"], False)],
)
def test_only_moe_models_with_a_positive_period_get_the_callback(tmp_path, pretrain_cfg, overrides, attached):
    trainer = build_trainer(pretrain_cfg(overrides), tmp_path, [], None)
    found = [c for c in trainer.callbacks if isinstance(c, RoutingFluctuation)]
    assert len(found) == int(attached)
    assert not found or (found[0].every_n_steps == 25 and found[0].run_dir == tmp_path)


@pytest.mark.parametrize(("every", "epochs", "period"), [(None, 150, 15), (None, 3, 1), (None, 25, 2), (4, 150, 4), (0, 150, None)])
def test_the_online_monitor_period_scales_with_the_budget(tmp_path, pretrain_cfg, every, epochs, period):
    # null: about ten measurements a run, so measuring stays a small share of training; 0: off
    cfg = pretrain_cfg([f"trainer.max_epochs={epochs}", f"trainer.knn_every_n_epochs={'null' if every is None else every}"])
    found = [c for c in build_trainer(cfg, tmp_path, []).callbacks if isinstance(c, OnlineMonitor)]
    assert [c.every_n_epochs for c in found] == ([] if period is None else [period])


@pytest.mark.slow
def test_the_online_monitor_logs_each_epoch_and_leaves_no_trace(tmp_path, pretrain_cfg):
    budget = [
        "model.moe_layers=[1]",
        "model.num_experts=4",
        "data.train_subset=256",
        "trainer.max_epochs=2",
        "trainer.fluctuation_every_n_steps=0",
    ]
    monitored = run_pretrain(pretrain_cfg([*budget, "trainer.knn_every_n_epochs=1"]), tmp_path / "on")
    quiet = run_pretrain(pretrain_cfg([*budget, "trainer.knn_every_n_epochs=0"]), tmp_path / "off")
    rows = (monitored / "logs" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    for key in ("monitor/knn_top1", "monitor/routing_agreement", "monitor/routing_agreement_chance"):
        assert sum(1 for r in rows[1:] if r.split(",")[header.index(key)]) == 2, key  # once per epoch
    quiet_log = quiet / "logs" / "metrics.csv"
    assert not quiet_log.exists() or "monitor/knn_top1" not in quiet_log.read_text()
    weights = [
        torch.load(r / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"] for r in (monitored, quiet)
    ]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # measuring changed nothing in the training
    a, b = (json.loads((r / "metrics.json").read_text()) for r in (monitored, quiet))
    assert a["knn_top1"] == b["knn_top1"] and a["routing_agreement"] == b["routing_agreement"]
    assert a["monitor_time_s"] > 0 and b["monitor_time_s"] == 0  # the time spent measuring is reported next to train_time_s
