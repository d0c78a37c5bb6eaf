"""Backbones by name: ``model.name`` in a run config picks a registered builder.

A builder takes the run config (``model``, ``router``, ``experts``, ``patches``,
``schedule``), the data's image size and channels and the run's patch selector,
and returns a backbone whose forward gives ``(features, ForwardAux)``. Register
one with ``@register_model("name")``; :func:`build_backbone` is what the
training, evaluation and loading code call.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ssroute.errors import ConfigError
from ssroute.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    return MODELS.register(name)


def build_backbone(cfg, image_size: int, channels: int) -> nn.Module:
    """The backbone of run config ``cfg`` for the data's image size and channels."""
    import ssroute.models  # noqa: F401  (registers every model)

    return MODELS.get(cfg.model.name)(cfg, image_size, channels, build_selector(cfg, image_size))


def build_selector(cfg, image_size: int):
    """The run's patch selector (``patches=``; None = the grid)."""
    from ssroute.patches import build_patch_selector

    patches = cfg.get("patches")
    if patches is None:  # configs written before patch selection existed
        return None
    return build_patch_selector(patches, cfg.model.patch_size, image_size, cfg.model.dim)


def check_model(cfg) -> None:
    """Cross-checks of ``model.*`` that need no data (block indices, per-layer k)."""
    model = cfg.model
    bad = [i for i in model.moe_layers if not 0 <= i < model.depth]
    if bad:
        raise ConfigError(f"model.moe_layers={list(model.moe_layers)} names blocks outside 0..{model.depth - 1}; use block indices below model.depth.")
    if model.moe_k and len(model.moe_k) != len(model.moe_layers):
        raise ConfigError(f"model.moe_k={list(model.moe_k)} must give one k per entry of model.moe_layers={list(model.moe_layers)}.")
    moa = set((model.get("moa") or {}).get("layers") or [])
    if moa and model.get("position", "absolute") == "rope":
        raise ConfigError("model.moa.layers with model.position=rope: the mixture of attention heads does not rotate its queries and keys; use model.position=absolute.")
    if moa & set(model.moe_layers) or any(not 0 <= i < model.depth for i in moa):
        raise ConfigError(
            f"model.moa.layers={sorted(moa)} must name blocks below model.depth whose FFN is dense (not in model.moe_layers={list(model.moe_layers)})."
        )
    depth_layers = list(model.get("depth_layers") or [])
    if len(depth_layers) > 1 or any(not 0 <= i < model.depth for i in depth_layers):
        raise ConfigError(f"model.depth_layers={depth_layers} must name at most one block below model.depth={model.depth} (one pool routed over depth).")
    if set(depth_layers) & (set(model.moe_layers) | moa):
        raise ConfigError(
            f"model.depth_layers={depth_layers} replaces a whole block, so it cannot also be in model.moe_layers or model.moa.layers; route that block one way."
        )
    shape = model.get("shape") or {}
    if depth_layers and any(shape.get(key) for key in ("heads", "ffn_hidden", "experts")):
        raise ConfigError("model.shape (a pruned model) with model.depth_layers: pruning does not reach a pool routed over depth; drop one of them.")
    for key in ("heads", "ffn_hidden", "experts"):
        values = list(shape.get(key) or [])
        if values and len(values) != model.depth:
            raise ConfigError(f"model.shape.{key}={values} must give one value per block (model.depth={model.depth}); [] = uniform.")
