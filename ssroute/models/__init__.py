"""Backbones built from config."""

from __future__ import annotations

from ssroute.errors import ConfigError
from ssroute.models.vit import ViT

__all__ = ["ViT", "build_backbone"]


def build_backbone(cfg, image_size: int, channels: int) -> ViT:
    """The backbone ``cfg.name`` for images of the given size and channels (read from the data)."""
    if cfg.name != "vit":
        raise ConfigError(f"unknown model {cfg.name!r}; choose one of: vit.")
    return ViT(
        image_size=image_size,
        channels=channels,
        dim=cfg.dim,
        depth=cfg.depth,
        heads=cfg.heads,
        patch_size=cfg.patch_size,
        mlp_ratio=cfg.mlp_ratio,
        activation=cfg.activation,
        dropout=cfg.dropout,
    )
