"""python -m ssroute.evaluate end to end on a tiny digits run, the end-of-run evaluation, and its errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ssroute.errors import ConfigError
from ssroute.eval.evaluation import LABELLED
from ssroute.evaluate import evaluate_checkpoint
from ssroute.train.pretrain import run_pretrain
from tests.conftest import compose_config

ROOT = Path(__file__).resolve().parents[1]
TINY_MOE = [
    "model.moe_layers=[1]",
    "model.num_experts=4",
    "trainer.max_epochs=1",
    "data.train_subset=256",  # 2 steps; the evaluation's probes also train on these 256 (the test split stays 360)
    "trainer.knn_every_n_epochs=0",
    "trainer.fluctuation_every_n_steps=0",
    "evaluate=true",  # the conftest budget turns it off; this is the test of the end-of-run evaluation
]
QUICK = ["protocols=[knn,retrieval]"]

_RUNS: dict = {}  # one pretraining run shared by the tests below (pretrain_cfg is function-scoped)


@pytest.fixture
def moe_run(tmp_path_factory, pretrain_cfg) -> Path:
    if "moe" not in _RUNS:
        _RUNS["moe"] = run_pretrain(pretrain_cfg(TINY_MOE), tmp_path_factory.mktemp("evaluate") / "run")
    return _RUNS["moe"]


def evaluate(checkpoint, overrides=()):
    overrides = [f"checkpoint={checkpoint}", *overrides]
    return evaluate_checkpoint(compose_config("evaluate", overrides), overrides)


@pytest.mark.slow
def test_end_of_run_evaluation_writes_metrics_and_report_and_merges_headlines(moe_run):
    metrics = json.loads((moe_run / "eval" / "metrics.json").read_text())
    expected = {"knn_top1", "linear_top1", "retrieval/precision_at_1", "retrieval/map_at_r", "eval_time_s"}
    expected |= {f"fewshot/{n}shot_top1{s}" for n in (1, 5, 10) for s in ("", "_std")}
    expected |= {f"block{i}/{p}_top1" for i in (0, 1) for p in ("knn", "linear")}  # model.depth=2: one pair per block
    assert expected <= metrics.keys()
    accuracies = [k for k in expected if k.endswith("_top1") or k == "retrieval/precision_at_1"]
    assert all(metrics[k] > 0.15 for k in accuracies), sorted((metrics[k], k) for k in accuracies)  # above chance (0.1) by a margin
    run = json.loads((moe_run / "metrics.json").read_text())
    assert {"knn_top1", "linear_top1", "train_time_s", "images_per_s", "routing_agreement", "routing_position_nmi"} <= run.keys()  # DESIGN's keys
    assert {"expert_usage_entropy", "routing_agreement_chance", "routing_shift_content"} <= metrics.keys()  # the same keys as pretraining's
    # one evaluation: the run's metrics.json holds exactly what eval/metrics.json measured, plus the run's own figures
    assert all(run[k] == v for k, v in metrics.items()) and run["train_time_s"] > 0
    report = (moe_run / "eval" / "report.md").read_text()
    assert report.startswith(f"# Evaluation of {moe_run}") and "## Per-block probes" in report and "| 1 | MoE |" in report
    for plot in (moe_run / "eval").glob("plots/*.png"):
        assert f"(plots/{plot.name})" in report


@pytest.mark.slow
def test_command_prints_the_folder_and_runs_only_the_protocols_asked(moe_run, tmp_path):
    out = tmp_path / "eval"
    result = subprocess.run(
        [sys.executable, "-m", "ssroute.evaluate", f"checkpoint={moe_run}", f"out={out}", *QUICK],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == f"evaluation folder: {out}"
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"data", "num_train", "num_test", "held_out", "eval_time_s", "knn_top1", "retrieval/precision_at_1", "retrieval/map_at_r"}
    assert (out / "report.md").is_file() and not (ROOT / "outputs").exists()


def test_missing_checkpoint_is_one_sentence_and_exit_2(tmp_path, monkeypatch, capsys):
    from ssroute.evaluate import main  # in-process: the same hydra entry point as python -m, without a second start-up

    monkeypatch.setattr(sys, "argv", ["ssroute.evaluate", f"checkpoint={tmp_path / 'nothing'}"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: checkpoint={tmp_path / 'nothing'} is neither a .ckpt file nor a run folder with checkpoints/last.ckpt; pass the folder that pretraining printed."
    ]


def rewritten(run: Path, tmp_path: Path, **model) -> Path:
    """A copy of the run's checkpoint whose saved config claims another architecture."""
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    checkpoint["hyper_parameters"]["config"]["model"].update(model)
    file = tmp_path / "foreign.ckpt"
    torch.save(checkpoint, file)
    return file


@pytest.mark.parametrize(
    ("model", "named"),
    [
        ({"depth": 3, "moe_layers": [1]}, "weight(s) the model needs are missing, e.g. blocks.2."),
        ({"mlp_ratio": 4.0}, "in the checkpoint but"),
    ],
)
@pytest.mark.slow
def test_incompatible_checkpoint_names_the_mismatch(moe_run, tmp_path, model, named):
    with pytest.raises(ConfigError) as err:
        evaluate(rewritten(moe_run, tmp_path, **model), QUICK)
    message = str(err.value)
    assert named in message and "\n" not in message and message.endswith("with the config saved beside its weights.")


def flat_folder(root: Path, count: int = 24) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    root.mkdir()
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8), mode="L").save(root / f"{i}.png")
    return root


@pytest.mark.slow
def test_unlabelled_data_skips_the_labelled_protocols_or_refuses_them_by_name(moe_run, tmp_path):
    data = ["data=image_folder", f"data.root={flat_folder(tmp_path / 'flat')}", f"out={tmp_path / 'eval'}"]
    result = evaluate(moe_run, [*data, "protocols=[stability]", "stability_strengths=[1.0]", "max_routing_images=16"])
    assert not set(LABELLED) & result.metrics.keys() and result.metrics["num_test"] == 0
    result = evaluate(moe_run, [*data, "protocols=null", "stability_pairs=0", "max_routing_images=16"])
    assert set(result.skipped) >= set(LABELLED) and result.skipped["knn"] == "data image_folder has no labels"
    assert "Skipped: knn (data image_folder has no labels)" in (tmp_path / "eval" / "report.md").read_text()
    with pytest.raises(ConfigError, match=r"^data image_folder has no labels, so protocols \['knn'\] cannot run; drop them"):
        evaluate(moe_run, [*data, "protocols=[knn,stability]"])


@pytest.mark.slow
def test_unknown_protocol_is_refused(moe_run):
    with pytest.raises(ConfigError, match=r"names unknown protocol\(s\) \['knm'\]; choose from"):
        evaluate(moe_run, ["protocols=[knm]"])


def test_evaluate_config_is_a_typed_schema():
    cfg = compose_config("evaluate", ["checkpoint=x"])
    assert OmegaConf.get_type(cfg).__name__ == "EvaluateConfig" and cfg.knn_k == 20 and cfg.knn_temperature == 0.07
    with pytest.raises(Exception, match="fewshot_draws"):
        compose_config("evaluate", ["fewshot_draws=many"])
