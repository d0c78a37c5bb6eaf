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
from ssroute.layers.rope import rotate


class Attention(nn.Module):
    """Multi-head self-attention.

    Args:
        dim: token width; must be divisible by ``heads``.
        heads: number of attention heads.
        dropout: dropout on the attention weights and the output projection.
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"model.dim={dim} is not divisible by model.heads={heads}; pick a dim that is a multiple of heads.")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``mask [batch, tokens]``: False marks padding no token may attend to (None = all tokens real);
        ``rope``: the ``(cos, sin)`` rotation of queries and keys (``ssroute.layers.rope``; None = no rotation)."""
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        keys = None if mask is None else mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keys, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))
