"""The pre-norm transformer block with a pluggable FFN.

``x + attn(norm(x))`` then ``x + ffn(norm(x))``. The FFN slot takes any module
``[batch, tokens, dim] -> [batch, tokens, dim]``: the dense :class:`FeedForward`
or an MoE layer (``ssroute.build_moe``), which is how routing blocks are made.
An FFN with a ``forward_with_routing`` method (the MoE layer) hands its routing
up: the block returns ``(tokens, routing)``, ``routing`` None for a dense FFN.

>>> import torch
>>> block = TransformerBlock(dim=32, heads=4, ffn=FeedForward(32, 64))
>>> y, routing = block(torch.randn(2, 7, 32))
>>> y.shape, routing
(torch.Size([2, 7, 32]), None)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ssroute.layers.attention import Attention
from ssroute.layers.mlp import FeedForward  # noqa: F401  (re-exported for the doctest)


class TransformerBlock(nn.Module):
    """Pre-norm self-attention block.

    Args:
        dim: token width.
        heads: attention heads.
        ffn: the feed-forward module (dense or MoE) applied after attention.
        dropout: attention dropout.
        head_dim: width of one attention head; None = ``dim / heads``.
        attention: ``softmax`` or ``relu`` attention.
        attn: an attention module to use instead (a mixture of attention heads, ``ssroute.moe.attention_heads``,
            whose routing the block hands up when its FFN is dense).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        ffn: nn.Module,
        dropout: float = 0.0,
        head_dim: int | None = None,
        attention: str = "softmax",
        attn: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = attn if attn is not None else Attention(dim, heads, dropout, head_dim, attention)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = ffn
        self.routed = hasattr(ffn, "forward_with_routing")
        self.routed_attention = hasattr(self.attn, "forward_with_routing")

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, Any]:
        """``mask [batch, tokens]``: False marks padding that attention ignores (None = all tokens real);
        ``rope``: the rotary position code of the tokens (``ssroute.layers.rope``; None = positions are in the tokens).

        Returns the tokens and the FFN's routing (None for a dense FFN).
        """
        if self.routed_attention:
            y, routing = self.attn.forward_with_routing(self.norm1(x), mask)
            x = x + y
            if not self.routed:
                return x + self.ffn(self.norm2(x)), routing
        else:
            x = x + self.attn(self.norm1(x), mask, rope)
        if self.routed:
            y, routing = self.ffn.forward_with_routing(self.norm2(x))
            return x + y, routing
        return x + self.ffn(self.norm2(x)), None


def init_weights(module: nn.Module) -> None:
    """ViT initialisation (``module.apply(init_weights)``): truncated-normal linear weights (std 0.02), zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
