"""DDP with 2 CPU processes (gloo) on digits runs to completion and gathers metrics across ranks."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    run = tmp_path / "ddp"
    result = subprocess.run(
        [
            sys.executable, "-m", "pretrain", "trainer=ddp_cpu", "trainer.max_epochs=2", "trainer.knn_every_n_epochs=1",
            "trainer.progress_bar=false", "model=vit_tiny", "schedule=end_to_end", "model.dim=32", "model.depth=2", "data.batch_size=64", f"hydra.run.dir={run}",
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    # 1437 images, 2 ranks x 64 per step -> 11 steps per epoch, and every image counted once
    assert metrics["steps"] == 22
    assert metrics["knn_top1"] > 0.15 and "linear_top1" in metrics  # above chance (0.1): both ranks' features were gathered
    assert f"run folder: {run}" in result.stdout and "result: linear_top1" in result.stdout
