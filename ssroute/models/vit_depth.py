"""``model=vit_depth``: a ViT whose blocks are one :class:`~ssroute.models.depth_router.DepthRoutedStack`.

(A pool routed over depth can also take one block's place inside a stack,
``model.stack=[ssl,depth,ssl]``: ``ssroute.models.vit``.)

Patch embedding (any patch selector) -> up to ``max_steps`` routed steps over a
shared pool of blocks and identities -> final LayerNorm and mean pool. The pool
lives in ``stack.blocks``; ``blocks`` is empty, so there are no stages to train
layerwise and fine-tuning's layer decay reaches only the patch embedding.

>>> import torch
>>> vit = DepthRoutedViT(image_size=8, channels=1, dim=32, heads=4, patch_size=2, pool_blocks=2, identity_blocks=1, max_steps=3)
>>> features, aux = vit(torch.randn(5, 1, 8, 8))
>>> features.shape, tuple(aux.depth.picks.shape)
(torch.Size([5, 32]), (5, 3))
"""

from __future__ import annotations

import torch
from torch import Tensor

from ssroute.errors import ConfigError
from ssroute.models.depth_router import DepthRoutedStack, depth_router_options
from ssroute.models.registry import register_model
from ssroute.models.vit import ForwardAux, ViT, token_options
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
        stem: ``patch`` or ``conv`` (``ssroute.layers.patch_embed``).
        position: ``absolute`` (a code added to the tokens) or ``rope`` (rotary positions in every pool block's attention).
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
        stem: str = "patch",
        position: str = "absolute",
        **routing,
    ) -> None:
        super().__init__(
            image_size, channels, dim, 0, heads, patch_size, mlp_ratio, activation, dropout, selector=selector, stem=stem, position=position
        )
        self.stack = DepthRoutedStack(dim, heads, mlp_ratio=mlp_ratio, activation=activation, dropout=dropout, **routing)

    def forward(
        self, images: Tensor, *, end: int | None = None, frozen_below: int = 0, segment=None, keep_blocks: bool = False
    ) -> tuple[Tensor, ForwardAux]:
        """Features ``[batch, dim]`` after at most ``end`` routed steps (all by default) and the forward's aux,
        with the choices in ``aux.depth`` and the ACT ponder cost as ``aux.losses["depth_ponder"]``."""
        if frozen_below or segment is not None:
            raise ValueError("model=vit_depth shares its pool blocks across steps: it has no frozen prefix or segments to train apart")
        patches = self.embed(images)
        outputs: list[Tensor] | None = [] if keep_blocks else None
        rope = None if self.rope is None else self.rope(patches.centres)
        x, trace = self.stack(patches.tokens, patches.mask, patches.pool_weights, steps=end, outputs=outputs, rope=rope)
        aux = ForwardAux(patches=patches, tokens=x, block_tokens=outputs, depth=trace)
        if trace.ponder_loss is not None and torch.is_grad_enabled():
            aux.losses["depth_ponder"] = trace.ponder_loss
        if patches.aux_loss is not None:
            aux.losses["ponder"] = patches.aux_loss
        return self.pool(x, patches.pool_weights, self.norm), aux


@register_model("vit_depth")
def build_depth_routed_vit(cfg, image_size: int, channels: int, selector: PatchSelector | None = None) -> DepthRoutedViT:
    """The ``model=vit_depth`` backbone of run config ``cfg``; refuses what routing over depth does not support."""
    model, depth = cfg.model, cfg.model.depth_router
    if model.moe_layers or model.stack or model.get("depth_layers"):
        raise ConfigError(
            "model=vit_depth routes every block over depth and has no MoE FFN or stack; drop model.moe_layers and model.stack, "
            "or put a pool routed over depth inside a stack with model=ssl_route_ssl model.stack=[ssl,depth,ssl]."
        )
    schedule = cfg.get("schedule")
    if schedule is not None and schedule.name != "end_to_end":
        raise ConfigError(
            f"model=vit_depth needs schedule=end_to_end (got {schedule.name}): its pool is one stage shared by every step; "
            "for layerwise training put the pool in a stack (model.stack=[ssl,depth,ssl])."
        )
    return DepthRoutedViT(
        image_size=image_size,
        channels=channels,
        selector=selector,
        **token_options(model),
        pool_blocks=depth.pool_blocks or model.depth,
        max_steps=depth.max_steps or model.depth,
        **depth_router_options(depth),
    )
