"""Dense ViTs trained here as timm ``VisionTransformer`` weights (``format=timm``).

ssroute's dense ViT on the patch grid is timm's ``VisionTransformer`` without a
class token, mean-pooled after the final LayerNorm (``class_token=False,
global_pool="avg", fc_norm=False``), with the fixed sine-cosine position code of
the grid as its ``pos_embed`` table. Parameter names map one to one
(``blocks.i.ffn`` -> ``blocks.i.mlp``). One difference is absorbed in the
weights: ssroute's LayerNorms use ``eps=1e-5`` and timm's ViT ``eps=1e-6``.
Since ``LayerNorm_eps(x) = LayerNorm_eps/c²(x / c)``, the residual stream is stored
scaled by ``c = 1/sqrt(10)`` (patch embedding, position table and the
output projections of attention and MLP), and timm's ``eps=1e-6`` LayerNorms
then compute exactly what ssroute's compute: every LayerNorm output, the tokens
after the final norm and the pooled features agree to float rounding, and the
folder loads with timm's own defaults (``config.json`` holds every argument).
Only the raw residual stream between blocks (before a LayerNorm) is ``c`` times ssroute's.

What cannot map is refused with one sentence: MoE FFNs (timm's ViT block has
one dense MLP), positions from continuous patch centres (patch selectors other
than the grid: timm adds a fixed table per grid cell), rotary positions, a
convolutional stem, routing over depth.

>>> timm_architecture(64), timm_architecture(384)
('vit_tiny_patch16_224', 'vit_small_patch16_224')
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ssroute.checkpoint import ModelInputs
from ssroute.errors import ConfigError

RESIDUAL_SCALE = 1 / math.sqrt(10)  # LayerNorm eps 1e-5 (ssroute) -> 1e-6 (timm): x -> c x turns eps into eps / c^2
SCALED = ("patch_embed.proj.", "attn.proj.", "mlp.fc2.")  # what writes into the residual stream


def timm_architecture(dim: int) -> str:
    """The timm ViT entry point of the nearest width (``model_args`` override every size)."""
    for width, name in ((192, "vit_tiny_patch16_224"), (384, "vit_small_patch16_224"), (768, "vit_base_patch16_224")):
        if dim <= width:
            return name
    return "vit_large_patch16_224"


def check_timm_compatible(backbone: nn.Module, config: dict[str, Any], run: str) -> None:
    """One sentence when the backbone of ``run`` has a part timm's ViT cannot express."""
    from ssroute.moe import moe_layers

    fix = "export it with format=hub and load it with ssroute.load"
    if config["model"].get("name", "vit") != "vit":
        raise ConfigError(
            f"format=timm needs a dense ViT, but {run} is model.name={config['model']['name']} (routing over depth has no timm equivalent); {fix}."
        )
    model = config["model"]
    if model.get("depth_layers"):
        raise ConfigError(f"format=timm needs a dense ViT, but {run} routes block {list(model['depth_layers'])} over depth (no timm equivalent); {fix}.")
    for key, plain in (("position", "absolute"), ("stem", "patch")):  # rotary positions, a convolutional stem (configs before them: plain)
        if model.get(key, plain) != plain:
            raise ConfigError(
                f"format=timm needs model.{key}={plain}, but {run} has model.{key}={model[key]} (timm's plain ViT has no equivalent); {fix}."
            )
    routed = sorted(moe_layers(backbone))
    if routed:
        raise ConfigError(
            f"format=timm needs a dense ViT, but {run} has mixture-of-experts FFNs in blocks {routed} (a timm ViT block has one dense MLP); {fix}."
        )
    if backbone.patch_embed.selector is not None:
        name = (config.get("patches") or {}).get("name")
        raise ConfigError(
            f"format=timm needs patches on the grid, but {run} selects them with patches={name}, whose positions come from each patch's continuous centre (timm adds a fixed table per grid cell); {fix}."
        )


def timm_model_args(config: dict[str, Any], inputs: ModelInputs) -> dict[str, Any]:
    """The ``timm.create_model`` keyword arguments of an ssroute dense ViT (JSON-serialisable)."""
    model = config["model"]
    return {
        "img_size": inputs.image_size,
        "patch_size": model["patch_size"],
        "in_chans": inputs.channels,
        "embed_dim": model["dim"],
        "depth": model["depth"],
        "num_heads": model["heads"],
        "mlp_ratio": int(model["mlp_ratio"] * model["dim"]) / model["dim"],
        "act_layer": model.get("activation", "gelu"),
        "class_token": False,
        "global_pool": "avg",
        "fc_norm": False,
        "num_classes": 0,
    }


def timm_state_dict(backbone: nn.Module) -> dict[str, Tensor]:
    """The backbone's weights under timm's names, the residual stream scaled by :data:`RESIDUAL_SCALE`."""
    state = {}
    for key, value in backbone.state_dict().items():
        key = key.replace(".ffn.", ".mlp.")
        value = value.detach().cpu()
        state[key] = value * RESIDUAL_SCALE if any(part in key for part in SCALED) else value.clone()
    state["pos_embed"] = backbone.patch_embed.position.detach().cpu()[None] * RESIDUAL_SCALE
    return {key: value.contiguous() for key, value in state.items()}


def write_timm(folder: Path, backbone: nn.Module, config: dict[str, Any], inputs: ModelInputs) -> dict[str, Any]:
    """timm's Hub layout (``config.json`` with ``architecture``, ``model_args`` and ``pretrained_cfg``, ``model.safetensors``)
    into ``folder``, written by timm itself from a timm model holding the weights; returns the model arguments."""
    import timm
    from timm.models import save_for_hf

    args = timm_model_args(config, inputs)
    architecture = timm_architecture(args["embed_dim"])
    model = timm.create_model(architecture, pretrained=False, **args)
    model.load_state_dict(timm_state_dict(backbone), strict=True)
    size = (inputs.channels, inputs.image_size, inputs.image_size)
    pretrained_cfg = {
        "mean": list(inputs.mean),
        "std": list(inputs.std),
        "input_size": size,
        "crop_pct": 1.0,
        "fixed_input_size": True,
        "num_classes": 0,
    }
    save_for_hf(model, str(folder), model_config={"pretrained_cfg": pretrained_cfg}, model_args=args, safe_serialization=True)
    written = json.loads((folder / "config.json").read_text())
    written["pretrained_cfg"].update(tag="ssroute")  # not the tag of the ImageNet weights of the entry point
    written["pretrained_cfg"].pop("license", None)  # the entry point's licence says nothing about these weights
    (folder / "config.json").write_text(json.dumps(written, indent=2) + "\n")
    return {"architecture": architecture, **args}
