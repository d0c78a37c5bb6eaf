"""The dense feed-forward network of a transformer block.

Shapes: ``[..., dim] -> [..., dim]`` through ``hidden`` units.

>>> import torch
>>> ffn = FeedForward(dim=16, hidden=64)
>>> ffn(torch.randn(2, 5, 16)).shape
torch.Size([2, 5, 16])
"""

from __future__ import annotations

import torch
from torch import nn

from ssroute.errors import ConfigError

ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


def build_activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ConfigError(f"unknown activation {name!r}; choose one of: {', '.join(ACTIVATIONS)}.")
    return ACTIVATIONS[name]()


class FeedForward(nn.Module):
    """Two linear layers with an activation between them (the ViT MLP).

    Args:
        dim: token width.
        hidden: hidden width.
        activation: ``gelu``, ``relu`` or ``silu``.
        dropout: dropout after each linear layer.
    """

    def __init__(self, dim: int, hidden: int, activation: str = "gelu", dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = build_activation(activation)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))
