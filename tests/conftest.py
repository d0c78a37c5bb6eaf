"""Shared fixtures: Hydra compose for the entry points' configs, and small tiny-budget overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from ssroute.config import register_configs

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")

# A budget that exercises every code path on digits in a few seconds.
TINY = [
    "model=vit_tiny",  # the dense ViT; tests that need routing or a stack say so
    "trainer.max_epochs=2",
    "trainer.progress_bar=false",
    "trainer.knn_every_n_epochs=1",
    "trainer.checkpoint_every_n_steps=3",
    "model.dim=32",
    "model.depth=2",
    "data.batch_size=128",
    "evaluate=false",  # the end-of-run evaluation has its own tests (tests/test_evaluate_command.py)
]


def compose_config(name: str, overrides: list[str]):
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


@pytest.fixture
def pretrain_cfg():
    return lambda overrides=(): compose_config("pretrain", [*TINY, "schedule=end_to_end", *overrides])


@pytest.fixture
def finetune_cfg():
    return lambda overrides=(): compose_config("finetune", [*TINY, *overrides])
