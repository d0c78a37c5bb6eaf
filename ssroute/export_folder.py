"""The exported folder: a pretrained backbone in the Hugging Face Hub model layout.

``config.json`` says what to build — the ``model``, ``router``, ``experts``,
``patches`` and ``schedule`` sections of the run config, and the ``inputs``
(image size, channels, normalisation) — and ``model.safetensors`` holds the
backbone's weights (the ``safetensors`` format: tensors only, no pickled code,
unlike a training checkpoint). ``README.md`` is the model card
(:mod:`ssroute.export.card`). ``ssroute.load(folder)`` rebuilds the backbone from
the config and loads the weights: the same tensors, so the same outputs, bit for
bit; neither Lightning nor Hydra is imported.

>>> import tempfile
>>> is_export(tempfile.mkdtemp())
False
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ssroute.checkpoint import ModelInputs, state_mismatch
from ssroute.errors import ConfigError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
FORMAT = "ssroute"
FORMAT_VERSION = 1
SECTIONS = ("model", "router", "experts", "patches", "schedule")  # what build_backbone reads from a run config


def export_config(run_config: dict[str, Any], inputs: ModelInputs, run: str) -> dict[str, Any]:
    """The ``config.json`` of an export of ``run`` (a run folder name) trained with ``run_config``."""
    from ssroute import __version__

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_name": "ssroute",
        "ssroute_version": __version__,
        "inputs": inputs.as_dict(),
        **{section: run_config[section] for section in SECTIONS if section in run_config},
        "source": {"run": run, "data": run_config["data"]["name"]},
    }


def weights_of(backbone: nn.Module) -> dict[str, Tensor]:
    """The backbone's state dict as contiguous CPU tensors (what safetensors stores)."""
    return {key: value.detach().cpu().contiguous() for key, value in backbone.state_dict().items()}


def write_export(folder: Path, config: dict[str, Any], weights: dict[str, Tensor], card: str) -> None:
    """``config.json``, ``model.safetensors`` and ``README.md`` into ``folder`` (a staging folder the caller renames)."""
    from safetensors.torch import save_file

    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(weights, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    (folder / CARD_NAME).write_text(card)


def is_export(path: str | Path) -> bool:
    """``path`` is a folder with a ``config.json`` (which :func:`read_export` then checks)."""
    return Path(path).is_dir() and (Path(path) / CONFIG_NAME).is_file()


def read_export(path: str | Path) -> tuple[dict[str, Any], dict[str, Tensor], ModelInputs]:
    """(config sections, weights, inputs) of an exported folder, with one sentence for a folder that is not one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(path)
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
    except (ValueError, UnicodeDecodeError):
        raise ConfigError(f"{folder / CONFIG_NAME} is not valid JSON; export the run again with python -m ssroute.export.") from None
    if isinstance(config, dict) and "architecture" in config and "model_args" in config:
        raise ConfigError(
            f"{folder} is a timm export (format=timm); load it with timm.create_model('local-dir:{folder}', pretrained=True), or export the run with format=hub for ssroute.load."
        )
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ConfigError(
            f'{folder} is not an ssroute export (its config.json has no "format": "{FORMAT}"); pass a folder written by python -m ssroute.export, a run folder or a .ckpt file.'
        )
    if int(config.get("format_version", 0)) > FORMAT_VERSION:
        raise ConfigError(
            f"{folder} was exported in format version {config['format_version']}, newer than this ssroute reads ({FORMAT_VERSION}); upgrade ssroute."
        )
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise ConfigError(f"{folder} has a config.json but no {WEIGHTS_NAME}; export the run again with python -m ssroute.export.")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise ConfigError(
            f"{weights} cannot be read ({err}); it is truncated or not a safetensors file, so export the run again."
        ) from None
    return {section: config[section] for section in SECTIONS if section in config}, state, ModelInputs.from_dict(config["inputs"])


def check_export_weights(backbone: nn.Module, state: dict[str, Tensor], path: str | Path) -> None:
    """Load ``state`` into ``backbone``, or one sentence saying how ``model.safetensors`` and ``config.json`` disagree."""
    problems = state_mismatch(backbone, state, WEIGHTS_NAME)
    if problems:
        raise ConfigError(
            f"{Path(path) / WEIGHTS_NAME} does not match its {CONFIG_NAME} ({problems}); keep the two files of one export together, or export the run again."
        )
    backbone.load_state_dict(state)
