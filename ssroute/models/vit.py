"""Vision transformer backbone (Dosovitskiy et al. 2021, arXiv 2010.11929), pre-norm, mean-pooled.

``images [batch, channels, height, width] -> tokens [batch, tokens, dim] -> features [batch, dim]``.
Blocks sit in a ``ModuleList`` and each block's FFN comes from ``ffn_factory(layer)``,
so an MoE layer can replace any block's FFN and blocks can be trained one at a time.

>>> import torch
>>> vit = ViT(image_size=8, channels=1, dim=32, depth=2, heads=4, patch_size=2)
>>> vit(torch.randn(5, 1, 8, 8)).shape
torch.Size([5, 32])
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ssroute.layers.block import TransformerBlock
from ssroute.layers.mlp import FeedForward
from ssroute.layers.patch_embed import PatchEmbed


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
    ) -> None:
        super().__init__()
        self.dim = dim
        hidden = int(mlp_ratio * dim)
        if ffn_factory is None:
            ffn_factory = lambda layer: FeedForward(dim, hidden, activation)  # noqa: E731
        self.patch_embed = PatchEmbed(channels, patch_size, dim, image_size)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, ffn_factory(i), dropout) for i in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.apply(_init_weights)

    def tokens(self, images: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        """``[batch, tokens, dim]`` after ``depth`` blocks (all by default), before the final norm."""
        x, _ = self.patch_embed(images)
        for block in self.blocks[:depth]:
            x = block(x)
        return x

    def block_outputs(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``[batch, tokens, dim]`` after each block, in order (for per-block analysis)."""
        x, _ = self.patch_embed(images)
        outputs = []
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        return outputs

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final LayerNorm and mean over tokens: ``[batch, tokens, dim] -> [batch, dim]``."""
        return self.norm(tokens).mean(dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.pool(self.tokens(images))


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
