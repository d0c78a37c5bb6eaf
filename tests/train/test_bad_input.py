"""Each bad input gets one clear sentence before training starts."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssroute.errors import ConfigError
from ssroute.train.finetune import run_finetune
from ssroute.train.pretrain import run_pretrain

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["data.name=imagenet"], "unknown dataset 'imagenet'; choose one of: digits"),
        (["ssl.name=mae"], "unknown SSL objective 'mae'; choose one of: "),
        (["model.name=resnet"], "unknown model 'resnet'; choose one of: vit"),
        (["model.patch_size=3"], r"model.patch_size=3 does not divide the digits image size 8; choose one of \[1, 2, 4, 8\]"),
        (["model.heads=5"], "model.dim=32 is not divisible by model.heads=5"),
        (["data.batch_size=5000"], "data.batch_size=5000 is larger than the 1437 training images per device"),
        (["data=image_folder"], "data=image_folder needs data.root=PATH"),
        (["resume=true"], "resume=true found no unfinished run"),
        (["consistency.balance=max"], "consistency.balance='max' is unknown; choose sinkhorn, sinkhorn_position, entropy or none"),
    ],
)
def test_pretrain_bad_config(tmp_path, pretrain_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message):
        run_pretrain(pretrain_cfg(overrides), tmp_path / "runs" / "x")
    assert not (tmp_path / "runs" / "x" / "checkpoints").exists()  # refused before any compute


def _flat_folder(root: Path) -> Path:
    root.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8), i * 40, dtype=np.uint8)).save(root / f"{i}.png")
    return root


def test_finetuning_an_unlabelled_folder_is_refused(tmp_path, finetune_cfg):
    folder = _flat_folder(tmp_path / "flat")
    cfg = finetune_cfg(["data=image_folder", f"data.root={folder}", "model.patch_size=2"])
    with pytest.raises(ConfigError, match="has no labels .* fine-tuning needs a labelled dataset"):
        run_finetune(cfg, tmp_path / "runs" / "ft", overrides=[])


@pytest.mark.slow
def test_checkpoint_mismatches_are_refused(tmp_path, pretrain_cfg, finetune_cfg):
    run = run_pretrain(pretrain_cfg(["trainer.max_epochs=1", "trainer.knn_every_n_epochs=0"]), tmp_path / "runs" / "pre")
    override = "model.dim=48"
    cfg = finetune_cfg([f"checkpoint={run}", override])
    with pytest.raises(ConfigError, match="model.dim=48 does not match the checkpoint, which was trained with model.dim=32"):
        run_finetune(cfg, tmp_path / "runs" / "ft", overrides=[override])
    with pytest.raises(ConfigError, match="is neither a .ckpt file nor a run folder"):
        run_finetune(finetune_cfg([f"checkpoint={tmp_path / 'nowhere'}"]), tmp_path / "runs" / "ft2", overrides=[])
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(ConfigError, match="was not written by ssroute"):
        run_finetune(finetune_cfg([f"checkpoint={foreign}"]), tmp_path / "runs" / "ft3", overrides=[])
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes((run / "checkpoints" / "last.ckpt").read_bytes()[:1000])
    with pytest.raises(ConfigError, match="cannot be read"):
        run_finetune(finetune_cfg([f"checkpoint={corrupt}"]), tmp_path / "runs" / "ft4", overrides=[])


@pytest.mark.slow
def test_entry_point_prints_one_sentence_not_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pretrain", "data.name=imagenet", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: unknown dataset 'imagenet'; choose one of:")
