"""Comparing the blocks of two runs with CKA."""

import json

import pytest

from ssroute.compare import compare, main
from ssroute.errors import ConfigError
from ssroute.train.pretrain import run_pretrain

QUICK = ["trainer.max_epochs=1", "trainer.knn_every_n_epochs=0"]


@pytest.mark.slow
def test_a_run_matches_itself_and_differs_from_another_seed(tmp_path, pretrain_cfg):
    a = run_pretrain(pretrain_cfg(QUICK), tmp_path / "runs" / "a")
    b = run_pretrain(pretrain_cfg([*QUICK, "seed=1"]), tmp_path / "runs" / "b")
    same = compare(str(a), str(a))
    assert all(abs(v - 1.0) < 1e-6 for v in same.values()) and len(same) == 2
    other = compare(str(a), str(b))
    assert all(0.0 < v < 0.999 for v in other.values())
    main([str(a), str(b)])
    saved = json.loads((a / "compare" / "b.json").read_text())
    assert saved["cka_across_runs/block0"] == pytest.approx(other["cka_across_runs/block0"])
    deeper = run_pretrain(pretrain_cfg([*QUICK, "model.depth=3"]), tmp_path / "runs" / "c")
    with pytest.raises(ConfigError, match="compare runs of the same stack"):
        compare(str(a), str(deeper))
