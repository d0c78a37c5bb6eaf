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


def write_checkpoint(run_dir: Path, overrides: list[str] = (), seed: int = 0, record_inputs: bool = True) -> Path:
    """A run folder with ``checkpoints/last.ckpt`` holding what training writes for loading (config, inputs, backbone
    weights), built from ``TINY + overrides`` with seeded random weights and no training: fast loading and export tests."""
    import torch
    from omegaconf import OmegaConf

    from ssroute.checkpoint import ModelInputs
    from ssroute.config import resolve_data_defaults
    from ssroute.data import build_data
    from ssroute.models import build_backbone
    from ssroute.train.schedule import resolve_stack

    replaced = {o.partition("=")[0] for o in overrides}
    cfg = compose_config("pretrain", [*(o for o in TINY if o.partition("=")[0] not in replaced), "schedule=end_to_end", *overrides])
    data = build_data(cfg.data, cfg.seed)
    resolve_data_defaults(cfg, data.image_size)
    resolve_stack(cfg)
    torch.manual_seed(seed)
    backbone = build_backbone(cfg, data.image_size, data.channels)
    for param in backbone.parameters():  # away from the init, so LayerNorm scales and biases matter
        param.data.add_(0.05 * torch.randn_like(param))
    hyper = {"config": OmegaConf.to_container(cfg, resolve=True)}
    if record_inputs:
        hyper["inputs"] = ModelInputs.of_data(data).as_dict()
    (run_dir / "checkpoints").mkdir(parents=True)
    torch.save({"hyper_parameters": hyper, "state_dict": {f"backbone.{k}": v for k, v in backbone.state_dict().items()}}, run_dir / "checkpoints" / "last.ckpt")
    return run_dir
