"""python -m ssroute.sweep_table over a real tiny 2 x 2 Hydra multirun on digits, plus unfinished runs and bad input."""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ssroute.errors import ConfigError
from ssroute.sweep_table import find_knobs, format_value, main, sweep_table

ROOT = Path(__file__).resolve().parents[1]
TINY_SWEEP = [
    "router=token_choice,expert_choice",
    "consistency.weight=0,1",
    "model=vit_tiny",
    "schedule=end_to_end",
    "model.moe_layers=[1]",
    "model.num_experts=4",
    "model.dim=32",
    "model.depth=2",
    "data.train_subset=256",
    "data.batch_size=128",
    "trainer.max_epochs=1",
    "trainer.knn_every_n_epochs=0",
    "trainer.progress_bar=false",
    "++evaluate=false",  # the end-of-run evaluation has its own tests; ++ sets it whether or not the key exists
]
_SWEEPS: dict = {}  # the multirun is shared by the tests below; each test works on its own copy


@pytest.fixture
def sweep(tmp_path_factory, tmp_path):
    if "dir" not in _SWEEPS:
        out = tmp_path_factory.mktemp("sweep") / "multirun"
        done = subprocess.run(
            [sys.executable, "-m", "pretrain", "-m", *TINY_SWEEP, f"hydra.sweep.dir={out}"], cwd=ROOT, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-3000:]
        _SWEEPS["dir"] = out
    copy = tmp_path / "multirun"
    shutil.copytree(_SWEEPS["dir"], copy)
    return copy


def read_csv(path):
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_a_2x2_multirun_becomes_four_rows_with_the_knobs_first_sorted_by_linear_probe(sweep, capsys):
    main([str(sweep)])
    printed = capsys.readouterr().out
    rows = read_csv(sweep / "sweep.csv")
    assert len(rows) == 4
    header = list(rows[0])
    assert header[:2] == ["router", "consistency.weight"]
    assert {"linear_top1", "routing_agreement", "routing_agreement_chance", "expert_usage_entropy", "train_time_s"} <= set(header)
    assert "test_top1" not in header  # only columns some run has
    assert sorted((r["router"], r["consistency.weight"]) for r in rows) == [
        (r, w) for r in ("expert_choice", "token_choice") for w in ("0", "1")
    ]
    top1 = [float(r["linear_top1"]) for r in rows]
    assert top1 == sorted(top1, reverse=True)
    for row in rows:  # each row carries its own run's metrics
        assert float(row["linear_top1"]) == json.loads((sweep / row["run"] / "metrics.json").read_text())["linear_top1"]
    markdown = (sweep / "sweep.md").read_text()
    assert printed.strip() in markdown and "`model.moe_layers=[1]`" in markdown  # shared overrides listed above the table
    assert sum(line.startswith("| ") for line in markdown.splitlines()) == 2 + 4  # header, alignment, one line per run


def test_unfinished_runs_are_listed_last_and_sort_keys_are_checked(sweep):
    shutil.copytree(sweep / "1", sweep / "4")
    (sweep / "4" / "metrics.json").unlink()
    sweep_table(sweep, sort="train_time_s", ascending=True)
    rows = read_csv(sweep / "sweep.csv")
    assert [r["status"] for r in rows] == ["done"] * 4 + ["unfinished"] and rows[-1]["run"] == "4"
    times = [float(r["train_time_s"]) for r in rows[:4]]
    assert times == sorted(times)
    with pytest.raises(
        ConfigError,
        match=r"--sort top5 is neither a knob nor a metric of this sweep; choose one of: router, consistency.weight, .*linear_top1",
    ):
        sweep_table(sweep, sort="top5")


def test_missing_and_empty_folders_get_one_sentence_and_exit_code_2(tmp_path, capsys):
    with pytest.raises(ConfigError, match="does not exist"):
        sweep_table(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="holds no run folders"):
        sweep_table(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2 and capsys.readouterr().err.startswith("error: sweep folder")


def test_knobs_are_the_overrides_that_vary_and_values_are_rounded_by_size():
    rows = [{"overrides": {"router": r, "seed": "0", "model.moe_k": k}} for r, k in (("vq", "[1]"), ("vq", "[2]"), ("hash", "[1]"))]
    assert find_knobs(rows) == (["router", "model.moe_k"], {"seed": "0"})
    assert [format_value(v) for v in (0.97234, 12.345, 1234.5, 3, None, "a|b")] == ["0.972", "12.3", "1234", "3", "", "a\\|b"]
