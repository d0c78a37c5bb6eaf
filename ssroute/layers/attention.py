"""Multi-head self-attention over the tokens of each image.

Shapes: ``[batch, tokens, dim] -> [batch, tokens, dim]``. Uses PyTorch's fused
``scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU).

>>> import torch
>>> attn = Attention(dim=32, heads=4)
>>> attn(torch.randn(2, 7, 32)).shape
torch.Size([2, 7, 32])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssroute.errors import ConfigError


class Attention(nn.Module):
    """Multi-head self-attention.

    Args:
        dim: token width; must be divisible by ``heads``.
        heads: number of attention heads.
        dropout: dropout on the attention weights and the output projection.
        head_dim: width of one head; None = ``dim / heads``. A structurally pruned model
            (``ssroute.prune``) keeps its heads' width while losing heads, down to 0 heads
            (the layer then adds only its output bias).
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0, head_dim: int | None = None) -> None:
        super().__init__()
        if head_dim is None and (heads < 1 or dim % heads):
            raise ConfigError(f"model.dim={dim} is not divisible by model.heads={heads}; pick a dim that is a multiple of heads.")
        self.heads = heads
        self.head_dim = dim // heads if head_dim is None else head_dim
        inner = heads * self.head_dim
        self.qkv = nn.Linear(dim, 3 * inner)
        self.proj = nn.Linear(inner, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``mask [batch, tokens]``: False marks padding no token may attend to (None = all tokens real)."""
        batch, tokens, _ = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        keys = None if mask is None else mask[:, None, None, :]
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=keys, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, self.heads * self.head_dim))
