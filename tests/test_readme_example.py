"""The README's Python example runs as written on a pretraining run of the default model (a tiny budget of it)."""

import re
from pathlib import Path

import pytest

from ssroute.train.pretrain import run_pretrain
from tests.conftest import compose_config

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    section = README.read_text().split("## Use it from Python, share it, log it", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_readme_example_prints_the_experts_of_the_quick_start_model(tmp_path, monkeypatch, capsys):
    # the quick start's model and schedule ([ssl, route, ssl], layerwise), one epoch per stage on 256 images
    cfg = compose_config("pretrain", ["trainer.max_epochs=3", "data.train_subset=256", "trainer.progress_bar=false", "evaluate=false",
                                      "trainer.knn_every_n_epochs=0", "trainer.fluctuation_every_n_steps=0"])  # fmt: skip
    monkeypatch.chdir(tmp_path)
    run_pretrain(cfg, tmp_path / "runs" / "pretrain" / "2026-01-01_00-00-00")
    capsys.readouterr()
    exec(compile(readme_example(), "README.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "features (2, 64) tokens (2, 16, 64)"
    (line,) = lines[1:]  # the default stack routes one block
    match = re.fullmatch(r"block (\d+): top expert of the first 8 patches of image 0: \[(.*)\]", line)
    assert match and int(match.group(1)) == cfg.model.stack.index("route") * cfg.model.ssl_layers
    experts = [int(e) for e in match.group(2).split(", ")]
    assert len(experts) == 8 and all(-1 <= e < cfg.model.num_experts for e in experts)
