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

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from ssroute.errors import ConfigError

PRETRAIN_RUNS = Path("runs/pretrain")


@dataclass(frozen=True)
class ModelInputs:
    """What a backbone takes: square images of ``image_size`` pixels with ``channels`` channels,
    normalised per channel as ``(x - mean) / std`` with ``x`` in [0, 1] (``ssroute.data.views.normalize``)."""

    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of_data(cls, data) -> ModelInputs:
        """The inputs of a :class:`~ssroute.data.DataBundle` (what its training runs record in their checkpoints)."""
        return cls(int(data.image_size), int(data.channels), tuple(map(float, data.mean)), tuple(map(float, data.std)))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelInputs:
        return cls(int(values["image_size"]), int(values["channels"]), tuple(map(float, values["mean"])), tuple(map(float, values["std"])))

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def last_checkpoint(run_dir: Path) -> Path:
    """Where a run folder keeps its checkpoint: ``<run>/checkpoints/last.ckpt``."""
    return run_dir / "checkpoints" / "last.ckpt"


def resolve_checkpoint(path: str) -> Path:
    """A run folder, a .ckpt file or ``latest`` (newest finished pretraining run) -> the checkpoint file."""
    if path == "latest":
        finished = sorted(PRETRAIN_RUNS.glob("*/metrics.json"), key=lambda p: p.stat().st_mtime)
        if not finished:
            raise ConfigError(
                f"checkpoint=latest found no finished pretraining run under {PRETRAIN_RUNS}; run python -m pretrain first or pass a run folder."
            )
        path = str(finished[-1].parent)
    p = Path(path)
    if p.is_dir():
        p = last_checkpoint(p)
    if not p.is_file():
        raise ConfigError(
            f"checkpoint={path} is neither a .ckpt file nor a run folder with checkpoints/last.ckpt; pass the folder that pretraining printed."
        )
    return p


def run_dir_of(file: Path) -> Path:
    """The run folder a checkpoint file belongs to (``<run>/checkpoints/last.ckpt`` -> ``<run>``)."""
    return file.parent.parent if file.parent.name == "checkpoints" else file.parent


def load_pretrained(path: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(run config, backbone state dict) of a checkpoint, with clear errors for foreign files."""
    config, state, _ = read_checkpoint(path)
    return config, state


def read_checkpoint(path: str) -> tuple[dict[str, Any], dict[str, torch.Tensor], ModelInputs]:
    """(run config, backbone state dict, model inputs) of a checkpoint.

    Checkpoints record their inputs (image size, channels, normalisation) in
    ``hyper_parameters["inputs"]``; for ones written before that, the run's data
    is rebuilt from its config to measure them.
    """
    _, checkpoint = load_checkpoint(path)
    hyper = checkpoint["hyper_parameters"]
    inputs = ModelInputs.from_dict(hyper["inputs"]) if hyper.get("inputs") else inputs_of_run(hyper["config"])
    return hyper["config"], state_under(checkpoint["state_dict"], "backbone."), inputs


def load_checkpoint(path: str, source_hint: str = "pass a checkpoint from python -m pretrain") -> tuple[Path, dict[str, Any]]:
    """(checkpoint file, the whole checkpoint) of a run folder, a .ckpt file or ``latest``.

    A file torch cannot read, or one without a run config holding ``model``
    inside ``hyper_parameters``, is a one-sentence error; ``source_hint`` ends the
    second (what the caller reads: pretraining runs, or also fine-tuned ones).
    The checkpoint holds ``hyper_parameters["config"]`` (the run config) and
    ``state_dict`` (every module's weights under its prefix, e.g. ``backbone.``).
    """
    file = resolve_checkpoint(path)
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise ConfigError(f"checkpoint {file} cannot be read ({type(err).__name__}); it is corrupt or not a PyTorch checkpoint.") from None
    config = checkpoint.get("hyper_parameters", {}).get("config") if isinstance(checkpoint, dict) else None
    if not config or "model" not in config:
        raise ConfigError(f"checkpoint {file} was not written by ssroute (no model config inside); {source_hint}.")
    return file, checkpoint


def state_under(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The weights of ``state_dict`` under ``prefix`` (``"backbone."``, ``"head."``), with the prefix taken off."""
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def inputs_of_run(config: dict[str, Any]) -> ModelInputs:
    """The inputs of a run whose checkpoint predates recording them: its data, rebuilt from the config."""
    from ssroute.data import build_data

    return ModelInputs.of_data(build_data(OmegaConf.create(config["data"]), config.get("seed", 0)))


def load_backbone_state(backbone: nn.Module, state: dict[str, torch.Tensor], file: Path | str) -> None:
    """``load_state_dict`` with one sentence naming what does not match."""
    problems = state_mismatch(backbone, state)
    if problems:
        raise ConfigError(
            f"checkpoint {file} does not fit the model its config builds on this data ({problems}); use it on the data it was trained on, with the config saved beside its weights."
        )
    backbone.load_state_dict(state)


def state_mismatch(backbone: nn.Module, state: dict[str, torch.Tensor], source: str = "the checkpoint") -> str:
    """What keeps ``state`` (read from ``source``) from loading into ``backbone`` (missing, extra and mis-shaped weights), or ``""``."""
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
        problems.append(f"{k} is {list(state[k].shape)} in {source} but {list(expected[k].shape)} in the model")
    return "; ".join(problems)


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
