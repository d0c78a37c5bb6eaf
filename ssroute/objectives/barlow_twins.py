"""Barlow Twins (Zbontar et al. 2021, arXiv 2103.03230): cross-correlation of two views towards identity.

Options (``ssl.options``): ``lambda_param`` (off-diagonal weight, default 0.005).

>>> import torch
>>> from torch import nn
>>> from ssroute.config import SSLConfig
>>> encoder = nn.Linear(8, 16)
>>> objective = BarlowTwins(encoder=encoder, dim=16, cfg=SSLConfig(proj_hidden=32, proj_dim=8))
>>> views = [torch.randn(4, 8), torch.randn(4, 8)]
>>> objective([encoder(v) for v in views], views, encoder).shape
torch.Size([])
"""

from __future__ import annotations

import torch
from lightly.loss import BarlowTwinsLoss
from lightly.models.modules.heads import BarlowTwinsProjectionHead
from torch import nn

from ssroute.objectives.base import OBJECTIVES, SSLObjective


@OBJECTIVES.register("barlow_twins")
class BarlowTwins(SSLObjective):
    """Projection head + lightly's Barlow Twins loss (gathered across DDP ranks).

    Args:
        encoder: the module being trained (unused; no teacher).
        dim: encoder feature width.
        cfg: ``proj_hidden`` and ``proj_dim`` of an :class:`SSLConfig`.
        lambda_param: weight of the off-diagonal (redundancy) term.
    """

    def __init__(self, encoder: nn.Module, dim: int, cfg, lambda_param: float = 0.005) -> None:
        super().__init__()
        self.head = BarlowTwinsProjectionHead(dim, cfg.proj_hidden, cfg.proj_dim)
        self.loss = BarlowTwinsLoss(lambda_param=lambda_param, gather_distributed=True)

    def forward(self, features: list[torch.Tensor], views: list[torch.Tensor], encoder) -> torch.Tensor:
        z0, z1 = (self.head(f) for f in features[:2])
        return self.loss(z0, z1)
