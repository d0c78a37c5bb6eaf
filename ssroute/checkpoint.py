"""Reading runs: the one place that turns a run folder, a ``.ckpt`` file or ``latest`` into a config and weights.

Fine-tuning, evaluation, upcycling, comparison and super-class features all
load backbones through here, so a foreign, corrupt or incompatible checkpoint
gets the same one-sentence error everywhere.

>>> from pathlib import Path
>>> import tempfile
>>> resolve_checkpoint(tempfile.mkdtemp())
Traceback (most recent call last):
...
ssroute.errors.ConfigError: checkpoint=... is neither a .ckpt file nor a run folder with checkpoints/last.ckpt; pass the folder that pretraining printed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from ssroute.errors import ConfigError

PRETRAIN_RUNS = Path("runs/pretrain")


def resolve_checkpoint(path: str) -> Path:
    """A run folder, a .ckpt file or ``latest`` (newest finished pretraining run) -> the checkpoint file."""
    if path == "latest":
        finished = sorted(PRETRAIN_RUNS.glob("*/metrics.json"), key=lambda p: p.stat().st_mtime)
        if not finished:
            raise ConfigError(f"checkpoint=latest found no finished pretraining run under {PRETRAIN_RUNS}; run python -m pretrain first or pass a run folder.")
        path = str(finished[-1].parent)
    p = Path(path)
    if p.is_dir():
        p = p / "checkpoints" / "last.ckpt"
    if not p.is_file():
        raise ConfigError(f"checkpoint={path} is neither a .ckpt file nor a run folder with checkpoints/last.ckpt; pass the folder that pretraining printed.")
    return p


def run_dir_of(file: Path) -> Path:
    """The run folder a checkpoint file belongs to (``<run>/checkpoints/last.ckpt`` -> ``<run>``)."""
    return file.parent.parent if file.parent.name == "checkpoints" else file.parent


def load_pretrained(path: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(run config, backbone state dict) of a checkpoint, with clear errors for foreign files."""
    file = resolve_checkpoint(path)
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise ConfigError(f"checkpoint {file} cannot be read ({type(err).__name__}); it is corrupt or not a PyTorch checkpoint.") from None
    config = checkpoint.get("hyper_parameters", {}).get("config") if isinstance(checkpoint, dict) else None
    if not config or "model" not in config:
        raise ConfigError(f"checkpoint {file} was not written by ssroute (no model config inside); pass a checkpoint from python -m pretrain.")
    state = {k[len("backbone."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("backbone.")}
    return config, state


def load_backbone_state(backbone: nn.Module, state: dict[str, torch.Tensor], file: Path | str) -> None:
    """``load_state_dict`` with one sentence naming what does not match."""
    expected = backbone.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [k for k in expected if k in state and expected[k].shape != state[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} weight(s) the model needs are missing, e.g. {missing[0]}")
    if unexpected:
        problems.append(f"{len(unexpected)} weight(s) the model lacks, e.g. {unexpected[0]}")
    if shapes:
        k = shapes[0]
        problems.append(f"{k} is {list(state[k].shape)} in the checkpoint but {list(expected[k].shape)} in the model")
    if problems:
        raise ConfigError(
            f"checkpoint {file} does not fit the model its config builds on this data ({'; '.join(problems)}); use it on the data it was trained on, with the config saved beside its weights."
        )
    backbone.load_state_dict(state)


def check_data_fits(data_name: str, data, backbone_state: dict[str, torch.Tensor], patch_size: int) -> None:
    """Channels and image size of ``data`` against the checkpoint's weights and patch size (fine-tuning and evaluation)."""
    from ssroute.layers.patch_embed import check_patch_size

    weight = backbone_state.get("patch_embed.proj.weight")
    if weight is not None and weight.shape[1] != data.channels:
        raise ConfigError(
            f"the checkpoint expects {weight.shape[1]}-channel images but data={data_name} has {data.channels}; use data like the pretraining data."
        )
    check_patch_size(patch_size, data.image_size, f"the checkpoint's model.patch_size={patch_size}", f"data={data_name}")


def load_backbone(path: str, data) -> tuple[nn.Module, dict[str, Any], Path]:
    """(backbone with the checkpoint's weights, in eval mode, its run config, the checkpoint file) for ``data``."""
    from ssroute.models import build_backbone

    file = resolve_checkpoint(path)
    config, state = load_pretrained(str(file))
    cfg = OmegaConf.create(config)
    check_data_fits(cfg.data.name, data, state, cfg.model.patch_size)
    backbone = build_backbone(cfg, data.image_size, data.channels)
    load_backbone_state(backbone, state, file)
    return backbone.eval(), config, file
