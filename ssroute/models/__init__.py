"""Backbones built from config: a ViT whose chosen blocks carry an MoE FFN."""

from __future__ import annotations

from torch import nn

from ssroute.errors import ConfigError
from ssroute.layers.mlp import FeedForward
from ssroute.models.vit import ViT

__all__ = ["ViT", "build_backbone", "extra_metrics"]


def build_backbone(cfg, image_size: int, channels: int) -> ViT:
    """The backbone of run config ``cfg`` (``model``, ``router``, ``experts``) for the data's image size and channels."""
    model = cfg.model
    if model.name == "vit_depth":  # routing over depth: a shared pool of blocks picked step by step
        from ssroute.models.vit_depth import build_depth_routed_vit

        return build_depth_routed_vit(cfg, image_size, channels, build_selector(cfg, image_size))
    if model.name != "vit":
        raise ConfigError(f"unknown model {model.name!r}; choose one of: vit, vit_depth.")
    bad = [i for i in model.moe_layers if not 0 <= i < model.depth]
    if bad:
        raise ConfigError(f"model.moe_layers={list(model.moe_layers)} names blocks outside 0..{model.depth - 1}; use block indices below model.depth.")
    if model.moe_k and len(model.moe_k) != len(model.moe_layers):
        raise ConfigError(f"model.moe_k={list(model.moe_k)} must give one k per entry of model.moe_layers={list(model.moe_layers)}.")
    hidden = int(model.mlp_ratio * model.dim)
    moe_layers = set(model.moe_layers)
    layer_k = dict(zip(model.moe_layers, model.moe_k, strict=False))

    def ffn(layer: int) -> nn.Module:
        if layer not in moe_layers:
            return FeedForward(model.dim, hidden, model.activation)
        from ssroute.layers.moe import build_moe

        router = dict(cfg.router)
        experts = dict(cfg.experts)
        if layer in layer_k:
            router["k"] = layer_k[layer]
        return build_moe(
            dim=model.dim,
            hidden=model.expert_hidden or hidden,
            num_experts=model.num_experts,
            router=router.pop("name"),
            experts=experts.pop("name"),
            router_options=router,
            expert_options=experts,
        )

    return ViT(
        selector=build_selector(cfg, image_size),
        image_size=image_size,
        channels=channels,
        dim=model.dim,
        depth=model.depth,
        heads=model.heads,
        patch_size=model.patch_size,
        mlp_ratio=model.mlp_ratio,
        activation=model.activation,
        dropout=model.dropout,
        ffn_factory=ffn,
    )


def extra_metrics(backbone: nn.Module, training: bool) -> dict[str, float]:
    """A backbone's own statistics (``backbone.extra_metrics``, e.g. ``depth/*`` of model=vit_depth); ``{}`` for a plain ViT.

    ``training``: of the training forwards since the last such call; else of the evaluation forwards since the last training forward.
    """
    hook = getattr(backbone, "extra_metrics", None)
    return hook(training) if hook is not None else {}


def build_selector(cfg, image_size: int):
    """The run's patch selector (``patches=``; None = the grid), checked against the schedule."""
    from ssroute.patches import build_patch_selector

    patches = cfg.get("patches")
    if patches is None:  # configs written before patch selection existed
        return None
    selector = build_patch_selector(patches, cfg.model.patch_size, image_size, cfg.model.dim)
    schedule = cfg.get("schedule")
    if selector is not None and selector.halts and schedule is not None and schedule.name != "end_to_end":
        raise ConfigError(f"patches={patches.name} needs schedule=end_to_end (layerwise stages run the blocks without its padding mask); change one of them.")
    return selector
