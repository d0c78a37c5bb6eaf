"""Multi-head self-attention over the tokens of each image.

Shapes: ``[batch, tokens, dim] -> [batch, tokens, dim]``. Uses PyTorch's fused
``scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU).

``kind="relu"`` replaces the softmax by ``relu(q k^T / sqrt(d)) / L`` with ``L``
the number of keys an image has (Wortsman et al. 2023, "Replacing softmax with
ReLU in Vision Transformers", arXiv 2309.08586): without the division by the
sequence length the attention output grows with ``L`` and training diverges;
with it, ReLU attention trains like softmax attention. Weights are non-negative
and need not sum to 1, so heads (and tokens) can be split into experts without
a normalisation that couples them (``ssroute.moe.attention_heads``).

>>> import torch
>>> attn = Attention(dim=32, heads=4)
>>> attn(torch.randn(2, 7, 32)).shape
torch.Size([2, 7, 32])
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ssroute.errors import ConfigError
from ssroute.layers.rope import rotate

ATTENTION_KINDS = ("softmax", "relu")


def check_attention(kind: str) -> str:
    if kind not in ATTENTION_KINDS:
        raise ConfigError(f"model.attention={kind!r} is not an attention; choose softmax or relu.")
    return kind


def attention_weights(scores: torch.Tensor, mask: torch.Tensor | None, kind: str) -> torch.Tensor:
    """``[..., queries, keys]`` scaled scores -> attention weights; ``mask [..., keys]`` False = padding.

    >>> attention_weights(torch.tensor([[1.0, -1.0, 3.0]]), None, "relu").tolist()
    [[0.3333333432674408, 0.0, 1.0]]
    """
    if kind == "relu":
        weights = torch.relu(scores)
        if mask is None:
            return weights / scores.shape[-1]
        keep = mask.unsqueeze(-2).to(weights.dtype)
        return weights * keep / keep.sum(-1, keepdim=True).clamp_min(1.0)
    if mask is not None:
        scores = scores.masked_fill(~mask.unsqueeze(-2), float("-inf"))
    return torch.softmax(scores, dim=-1)


class Attention(nn.Module):
    """Multi-head self-attention.

    Args:
        dim: token width; must be divisible by ``heads``.
        heads: number of attention heads.
        dropout: dropout on the attention weights and the output projection.
        head_dim: width of one head; None = ``dim / heads``. A structurally pruned model
            (``ssroute.prune``) keeps its heads' width while losing heads, down to 0 heads
            (the layer then adds only its output bias).
        kind: ``softmax`` or ``relu`` (ReLU divided by the sequence length; see the module docstring).
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0, head_dim: int | None = None, kind: str = "softmax") -> None:
        super().__init__()
        self.kind = check_attention(kind)
        if head_dim is None and (heads < 1 or dim % heads):
            raise ConfigError(f"model.dim={dim} is not divisible by model.heads={heads}; pick a dim that is a multiple of heads.")
        self.heads = heads
        self.head_dim = dim // heads if head_dim is None else head_dim
        inner = heads * self.head_dim
        self.qkv = nn.Linear(dim, 3 * inner)
        self.proj = nn.Linear(inner, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``mask [batch, tokens]``: False marks padding no token may attend to (None = all tokens real);
        ``rope``: the ``(cos, sin)`` rotation of queries and keys (``ssroute.layers.rope``; None = no rotation)."""
        batch, tokens, _ = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        if self.kind == "relu":
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
            weights = attention_weights(scores, None if mask is None else mask[:, None, :], "relu")
            out = F.dropout(weights, self.dropout, self.training) @ v
        else:
            keys = None if mask is None else mask[:, None, None, :]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=keys, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, self.heads * self.head_dim))
