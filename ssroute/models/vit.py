"""Vision transformer backbone (Dosovitskiy et al. 2021, arXiv 2010.11929), pre-norm, mean-pooled.

``images [batch, channels, height, width] -> tokens [batch, tokens, dim] -> features [batch, dim]``.
Blocks sit in a ``ModuleList`` and each block's FFN comes from ``ffn_factory(layer)``,
so an MoE layer can replace any block's FFN and blocks can be trained one at a time.

>>> import torch
>>> vit = ViT(image_size=8, channels=1, dim=32, depth=2, heads=4, patch_size=2)
>>> vit(torch.randn(5, 1, 8, 8)).shape
torch.Size([5, 32])

With a patch selector (``ssroute.patches``) the tokens are the selected patches;
``last_patches`` holds the last forward's centres ``[batch, N, 2]`` (and, for a
halting selector, the mask of patches taken, which attention and pooling obey).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ssroute.layers.block import TransformerBlock
from ssroute.layers.mlp import FeedForward
from ssroute.layers.patch_embed import PatchEmbed
from ssroute.patches.base import Patches, PatchSelector


class ViT(nn.Module):
    """Patch embedding, ``depth`` transformer blocks, a final LayerNorm and mean pooling.

    Args:
        image_size: square image side in pixels.
        channels: image channels.
        dim: token width.
        depth: number of transformer blocks.
        heads: attention heads.
        patch_size: patch side in pixels (must divide ``image_size``).
        mlp_ratio: dense FFN hidden width as a multiple of ``dim``.
        activation: FFN activation (gelu, relu, silu).
        dropout: attention dropout.
        ffn_factory: ``layer index -> FFN module``; default a dense :class:`FeedForward`.
        selector: which patches become tokens (``ssroute.patches``); None = the non-overlapping grid.
    """

    def __init__(
        self,
        image_size: int,
        channels: int,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        patch_size: int = 2,
        mlp_ratio: float = 2.0,
        activation: str = "gelu",
        dropout: float = 0.0,
        ffn_factory: Callable[[int], nn.Module] | None = None,
        selector: PatchSelector | None = None,
    ) -> None:
        super().__init__()
        self.dim = dim
        hidden = int(mlp_ratio * dim)
        if ffn_factory is None:
            ffn_factory = lambda layer: FeedForward(dim, hidden, activation)  # noqa: E731
        self.patch_embed = PatchEmbed(channels, patch_size, dim, image_size, selector)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, ffn_factory(i), dropout) for i in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.apply(_init_weights)
        self.last_patches: Patches | None = None  # the last forward's tokens, centres and mask

    def embed(self, images: torch.Tensor) -> Patches:
        """Patch embedding of a batch; remembered as :attr:`last_patches`."""
        self.last_patches = self.patch_embed.embed(images)
        return self.last_patches

    def tokens(self, images: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        """``[batch, tokens, dim]`` after ``depth`` blocks (all by default), before the final norm."""
        patches = self.embed(images)
        x = patches.tokens
        for block in self.blocks[:depth]:
            x = block(x, patches.mask)
        return x

    def block_outputs(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``[batch, tokens, dim]`` after each block, in order (for per-block analysis)."""
        patches = self.embed(images)
        x, outputs = patches.tokens, []
        for block in self.blocks:
            x = block(x, patches.mask)
            outputs.append(x)
        return outputs

    def pool(self, tokens: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Final LayerNorm and mean over tokens (``weights [batch, tokens]`` summing to 1: a weighted mean) -> ``[batch, dim]``."""
        if weights is None:
            return self.norm(tokens).mean(dim=1)
        return torch.einsum("bnd,bn->bd", self.norm(tokens), weights)

    def encode(self, tokens: torch.Tensor, mask: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Embedded tokens ``[batch, tokens, dim]`` through every block and the pool; ``mask`` False = padding."""
        for block in self.blocks:
            tokens = block(tokens, mask)
        return self.pool(tokens, weights)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = self.embed(images)
        return self.encode(patches.tokens, patches.mask, patches.pool_weights)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
