"""trainer.loggers: Lightning's CSV, TensorBoard, W&B (offline) and MLflow (local file store) loggers get the loss terms,
expert load, routing agreement, the final metrics and the plots; unknown or uninstalled names are refused first."""

import importlib.util
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ssroute.config import TrainerConfig
from ssroute.errors import ConfigError
from ssroute.eval.plots import plot_probe_accuracy
from ssroute.train.loggers import build_loggers, check_loggers, log_final
from ssroute.train.pretrain import run_pretrain


def tensorboard_tags(folder: Path) -> dict[str, list[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return events.Tags()


def test_unknown_or_uninstalled_loggers_are_refused_before_the_run(tmp_path, pretrain_cfg, monkeypatch):
    with pytest.raises(
        ConfigError,
        match=r"trainer.loggers=\['csv', 'neptune'\] names an unknown logger 'neptune'; choose from csv, tensorboard, wandb, mlflow.",
    ):
        run_pretrain(pretrain_cfg(["trainer.loggers=[csv,neptune]"]), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(
        ConfigError, match=r"trainer.loggers includes wandb but the wandb package is not installed; pip install -e \"\.\[wandb\]\"."
    ):
        check_loggers(["csv", "wandb"])


def test_final_metrics_and_plots_reach_tensorboard_and_csv_keeps_its_columns(tmp_path):
    pytest.importorskip("tensorboard")
    trainer_cfg = OmegaConf.merge(OmegaConf.structured(TrainerConfig), {"loggers": ["csv", "tensorboard"]})
    csv, board = build_loggers(trainer_cfg, tmp_path)
    csv.log_metrics({"loss/ssl": 1.5}, step=1)
    plot = plot_probe_accuracy(tmp_path / "eval" / "plots" / "probe_accuracy.png", {"block0/knn_top1": 0.5, "block1/knn_top1": 0.8})
    log_final([csv, board], {"knn_top1": 0.8, "mode": "full", "block1/routing_agreement": 0.6}, [plot], step=7)
    tags = tensorboard_tags(tmp_path / "logs" / "tensorboard")
    assert "plots/probe_accuracy" in tags["images"] and {"final/knn_top1", "final/block1/routing_agreement"} <= set(tags["scalars"])
    header = (tmp_path / "logs" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "loss/ssl" in header and not any(h.startswith("final/") for h in header)  # metrics.json is CSV's final record


@pytest.mark.slow
def test_a_routed_run_logs_to_all_four_offline(tmp_path, pretrain_cfg, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    cfg = pretrain_cfg(["model.moe_layers=[1]", "model.num_experts=4", "trainer.max_epochs=1", "data.train_subset=256", "trainer.log_every_n_steps=1",
                        "evaluate=true", "evaluation.block_linear=false", "evaluation.stability_strengths=[1.0]", "evaluation.max_routing_images=256",
                        "trainer.loggers=[csv,tensorboard,wandb,mlflow]", "trainer.log_project=ssroute-test"])  # fmt: skip
    run = run_pretrain(cfg, tmp_path / "run")
    plots = sorted(p.stem for p in (run / "eval" / "plots").glob("*.png"))
    assert "routing_maps" in plots and "expert_usage" in plots
    during = {
        "loss/ssl",
        "loss/consistency",
        "block1/load_e0",
        "block1/load_e3",
        "monitor/routing_agreement",
        "monitor/routing_agreement_chance",
    }
    final = {"final/routing_agreement", "final/knn_top1", "final/block1/expert_usage_entropy"}

    tags = tensorboard_tags(run / "logs" / "tensorboard")
    assert during | final <= set(tags["scalars"]) and {f"plots/{p}" for p in plots} <= set(tags["images"])

    (wandb_run,) = (run / "wandb").glob("offline-run-*")
    record = next(wandb_run.glob("run-*.wandb")).read_bytes()  # W&B's offline log of the run, synced later by wandb sync
    assert all(key.encode() in record for key in during | final | {"ssroute-test"})
    assert {p.name.rsplit("_", 2)[0] for p in (wandb_run / "files" / "media" / "images" / "plots").glob("*.png")} == set(plots)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"file:{tmp_path / 'mlruns'}")
    (found,) = client.search_runs([client.get_experiment_by_name("ssroute-test").experiment_id])
    assert {k.replace("/", ".") for k in during | final} <= set(found.data.metrics) and found.data.params["config/model/num_experts"] == "4"
    assert {a.path for a in client.list_artifacts(found.info.run_id, "plots")} == {f"plots/{p}.png" for p in plots}
