"""``model=vit_depth``: a ViT whose blocks are one :class:`~ssroute.models.depth_router.DepthRoutedStack`.

Patch embedding (any patch selector) -> up to ``max_steps`` routed steps over a
shared pool of blocks and identities -> final LayerNorm and mean pool. The pool
lives in ``stack.blocks``; ``blocks`` is empty, so there are no stages to train
layerwise and fine-tuning's layer decay reaches only the patch embedding.

>>> import torch
>>> vit = DepthRoutedViT(image_size=8, channels=1, dim=32, heads=4, patch_size=2, pool_blocks=2, identity_blocks=1, max_steps=3)
>>> vit(torch.randn(5, 1, 8, 8)).shape
torch.Size([5, 32])
>>> sorted(vit.extra_metrics(training=True))
['depth/blocks_per_image', 'depth/compute_saved', 'depth/identity_share', 'depth/steps_per_image']
"""

from __future__ import annotations

from torch import Tensor

from ssroute.errors import ConfigError
from ssroute.models.depth_router import DepthRoutedStack
from ssroute.models.vit import ViT
from ssroute.patches.base import PatchSelector


class DepthRoutedViT(ViT):
    """A ViT whose blocks are one :class:`DepthRoutedStack`: patch embedding -> routed steps -> final norm and pool.

    Args:
        image_size: square image side in pixels.
        channels: image channels.
        dim: token width.
        heads: attention heads.
        patch_size: patch side in pixels.
        mlp_ratio: FFN hidden width as a multiple of ``dim``.
        activation: FFN activation.
        dropout: attention dropout.
        selector: which patches become tokens (``ssroute.patches``); None = the grid.
        **routing: :class:`DepthRoutedStack` options (pool_blocks, identity_blocks, max_steps, halting, ...).
    """

    def __init__(
        self,
        image_size: int,
        channels: int,
        dim: int = 64,
        heads: int = 4,
        patch_size: int = 2,
        mlp_ratio: float = 2.0,
        activation: str = "gelu",
        dropout: float = 0.0,
        selector: PatchSelector | None = None,
        **routing,
    ) -> None:
        super().__init__(image_size, channels, dim, 0, heads, patch_size, mlp_ratio, activation, dropout, selector=selector)
        self.stack = DepthRoutedStack(dim, heads, mlp_ratio=mlp_ratio, activation=activation, dropout=dropout, **routing)

    def tokens(self, images: Tensor, depth: int | None = None) -> Tensor:
        """``[batch, tokens, dim]`` after at most ``depth`` routed steps (all by default), before the final norm."""
        patches = self.embed(images)
        return self.stack(patches.tokens, patches.mask, patches.pool_weights, steps=depth)

    def block_outputs(self, images: Tensor) -> list[Tensor]:
        """``[batch, tokens, dim]`` after each routed step (halted images keep their last state)."""
        patches = self.embed(images)
        outputs: list[Tensor] = []
        self.stack(patches.tokens, patches.mask, patches.pool_weights, outputs=outputs)
        return outputs

    def encode(self, tokens: Tensor, mask: Tensor | None = None, weights: Tensor | None = None) -> Tensor:
        return self.pool(self.stack(tokens, mask, weights), weights)

    def extra_metrics(self, training: bool) -> dict[str, float]:
        """``depth/*`` routing statistics (see :meth:`DepthRoutedStack.extra_metrics`)."""
        return self.stack.extra_metrics(training)


def build_depth_routed_vit(cfg, image_size: int, channels: int, selector: PatchSelector | None = None) -> DepthRoutedViT:
    """The ``model=vit_depth`` backbone of run config ``cfg``; refuses what routing over depth does not support."""
    model, depth = cfg.model, cfg.model.depth_router
    if model.moe_layers or model.stack:
        raise ConfigError(
            "model=vit_depth routes whole blocks over depth and has no MoE FFN or stack; drop model.moe_layers and model.stack."
        )
    schedule = cfg.get("schedule")
    if schedule is not None and schedule.name != "end_to_end":
        raise ConfigError(
            f"model=vit_depth needs schedule=end_to_end (got {schedule.name}): its pool blocks are shared by every step, so there are no stages."
        )
    return DepthRoutedViT(
        image_size=image_size,
        channels=channels,
        dim=model.dim,
        heads=model.heads,
        patch_size=model.patch_size,
        mlp_ratio=model.mlp_ratio,
        activation=model.activation,
        dropout=model.dropout,
        selector=selector,
        pool_blocks=depth.pool_blocks or model.depth,
        identity_blocks=depth.identity_blocks,
        max_steps=depth.max_steps or model.depth,
        halting=depth.halting,
        halt_epsilon=depth.halt_epsilon,
        ponder_weight=depth.ponder_weight,
        stop_on_identity=depth.stop_on_identity,
        sample=depth.sample,
        order_prior=depth.order_prior,
    )
