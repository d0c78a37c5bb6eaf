"""``python -m ssroute.export checkpoint=RUN out=DIR [format=hub|timm] [push_to_hub=REPO]``: share a pretrained backbone.

- ``format=hub`` (default): the Hugging Face Hub model layout of
  :mod:`ssroute.export_folder` — ``config.json``, ``model.safetensors``, and
  ``README.md``, a model card with the run's metrics, routing, data and budget
  (:mod:`ssroute.export.card`), with the run's ``eval/plots`` copied into
  ``plots/``. ``ssroute.load(DIR)`` reads it without Lightning or Hydra.
- ``format=timm``: a dense ViT as timm weights (:mod:`ssroute.export.timm_vit`),
  for ``timm.create_model("local-dir:DIR", pretrained=True)``; routed models,
  selected patches and routing over depth are refused with a sentence saying why.

Everything is checked before anything is written; the folder is written in a
temporary folder beside ``out`` and renamed, so ``out`` is either absent or
whole. ``push_to_hub=user/name`` then uploads it with ``huggingface_hub``.
Bad input prints ``error: ...`` and exits 2.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

from ssroute.errors import ConfigError

FORMATS = ("hub", "timm")

HUB_USAGE = """import torch, ssroute
model = ssroute.load("{out}")  # or ssroute.load(huggingface_hub.snapshot_download("user/name"))
images = torch.randint(0, 256, (4, {channels}, {size}, {size}), dtype=torch.uint8)  # uint8, or floats in [0, 1]
with torch.no_grad():
    features = model.embed(images)  # [4, {dim}]
    tokens = model.tokens(images)  # [4, patches, {dim}]
    for block, route in model.route(images).items():  # per routed block: experts and weights of every patch
        print(block, route.experts[0, :5].tolist(), route.weights[0, :5].tolist())"""

TIMM_USAGE = """import timm, torch
model = timm.create_model("local-dir:{out}", pretrained=True).eval()  # or "hf-hub:user/name"
# the same model by name: timm.create_model("{architecture}", checkpoint_path="{out}/model.safetensors", **config["model_args"])
data = timm.data.resolve_data_config({{}}, model=model)  # the normalisation it was trained with
images = torch.rand(4, {channels}, {size}, {size})  # floats in [0, 1]
features = model((images - torch.tensor(data["mean"]).view(1, -1, 1, 1)) / torch.tensor(data["std"]).view(1, -1, 1, 1))  # [4, {dim}]"""


def check_request(checkpoint: Any, out: Any, format: str, push_to_hub: Any) -> Path:
    """Every check that needs no weights; returns the output folder."""
    if not checkpoint:
        raise ConfigError(
            "checkpoint is required; pass checkpoint=RUN_FOLDER (or a .ckpt file, or latest) of a pretraining or fine-tuning run."
        )
    if not out:
        raise ConfigError("out is required; pass out=DIR, a folder that does not exist yet.")
    if format not in FORMATS:
        raise ConfigError(f"format={format} is not an export format; choose hub (ssroute.load) or timm (dense ViTs for timm.create_model).")
    folder = Path(str(out))
    if folder.exists():
        raise ConfigError(f"out={folder} already exists; pass a new folder (an export never writes into or over an existing one).")
    missing = [
        name
        for name, wanted in (("timm", format == "timm"), ("huggingface_hub", bool(push_to_hub)), ("safetensors", True))
        if wanted and not _installed(name)
    ]
    if missing:
        extra = {"timm": "timm", "huggingface_hub": "hub", "safetensors": "timm"}[missing[0]]
        raise ConfigError(f'this export needs the {missing[0]} package, which is not installed; pip install -e ".[{extra}]".')
    return folder


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def export_checkpoint(checkpoint: str, out: str, format: str = "hub", push_to_hub: str | None = None) -> Path:
    """Write the export of ``checkpoint`` into the new folder ``out``; returns the folder. ``push_to_hub`` is only
    checked here (huggingface_hub installed) so that the command refuses before writing; :func:`upload` uploads."""
    from ssroute.checkpoint import resolve_checkpoint, run_dir_of
    from ssroute.export.card import render_card
    from ssroute.export.timm_vit import check_timm_compatible, timm_architecture, write_timm
    from ssroute.export_folder import export_config, weights_of, write_export
    from ssroute.io import atomic_folder
    from ssroute.pretrained import load

    folder = check_request(checkpoint, out, format, push_to_hub)
    file = resolve_checkpoint(str(checkpoint))
    run_dir = run_dir_of(file)
    model = load(file)
    config = export_config(model.config, model.inputs, run_dir.name)
    if format == "timm":
        check_timm_compatible(model.backbone, config, str(run_dir))
    metrics_file = run_dir / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    plots = sorted((run_dir / "eval" / "plots").glob("*.png"))
    shown = {"channels": model.inputs.channels, "size": model.inputs.image_size, "dim": model.dim, "out": folder}
    if format == "hub":
        usage = HUB_USAGE.format(**shown)
    else:
        usage = TIMM_USAGE.format(architecture=timm_architecture(model.dim), **shown)
    card = render_card(config, model.config, metrics, [f"plots/{p.name}" for p in plots], usage)
    with atomic_folder(folder) as staging:
        if format == "hub":
            write_export(staging, config, weights_of(model.backbone), card)
        else:
            write_timm(staging, model.backbone, config, model.inputs)
            (staging / "README.md").write_text(card)
        if plots:
            (staging / "plots").mkdir()
            for plot in plots:
                shutil.copy2(plot, staging / "plots" / plot.name)
    return folder


def upload(folder: Path, repo: str) -> None:
    """Upload ``folder`` to the Hub model repository ``repo`` (created if needed)."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo, repo_type="model", exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model", commit_message="Upload from python -m ssroute.export")


def main() -> None:
    import hydra
    from omegaconf import DictConfig

    from ssroute.config import register_configs

    register_configs()

    @hydra.main(config_path=str(Path(__file__).resolve().parents[2] / "configs"), config_name="export", version_base="1.3")
    def run(cfg: DictConfig) -> None:
        try:
            folder = export_checkpoint(cfg.checkpoint, cfg.out, cfg.format, cfg.push_to_hub)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        print(f"export folder: {folder}")
        loader = f'timm.create_model("local-dir:{folder}", pretrained=True)' if cfg.format == "timm" else f'ssroute.load("{folder}")'
        print(f"load it with: {loader}")
        if cfg.push_to_hub:
            try:
                upload(folder, cfg.push_to_hub)
            except Exception as err:  # network, login or permission: the export itself is complete
                print(
                    f"error: the export is complete in {folder} but uploading it to {cfg.push_to_hub} failed ({type(err).__name__}: {err}); log in with huggingface-cli login and run huggingface-cli upload {cfg.push_to_hub} {folder}.",
                    file=sys.stderr,
                )
                sys.exit(1)
            print(f"uploaded to: https://huggingface.co/{cfg.push_to_hub}")

    run()


if __name__ == "__main__":
    main()
