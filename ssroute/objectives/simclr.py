"""SimCLR (Chen et al. 2020, arXiv 2002.05709): contrast two views with the NT-Xent loss.

>>> import torch
>>> from torch import nn
>>> from ssroute.config import SSLConfig
>>> encoder = nn.Linear(8, 16)
>>> objective = SimCLR(encoder=encoder, dim=16, cfg=SSLConfig(proj_hidden=32, proj_dim=8))
>>> views = [torch.randn(4, 8), torch.randn(4, 8)]
>>> objective([encoder(v) for v in views], views, encoder).shape
torch.Size([])
"""

from __future__ import annotations

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules.heads import SimCLRProjectionHead
from torch import nn

from ssroute.objectives.base import OBJECTIVES, SSLObjective


@OBJECTIVES.register("simclr")
class SimCLR(SSLObjective):
    """Projection head + NT-Xent (gathered across DDP ranks).

    Args:
        encoder: the module being trained (unused here; SimCLR has no teacher).
        dim: encoder feature width.
        cfg: ``proj_hidden``, ``proj_dim`` and ``temperature`` of an :class:`SSLConfig`.
    """

    def __init__(self, encoder: nn.Module, dim: int, cfg) -> None:
        super().__init__()
        self.head = SimCLRProjectionHead(dim, cfg.proj_hidden, cfg.proj_dim)
        self.loss = NTXentLoss(temperature=cfg.temperature, gather_distributed=True)

    def forward(self, features: list[torch.Tensor], views: list[torch.Tensor], encoder) -> torch.Tensor:
        z0, z1 = (self.head(f) for f in features[:2])
        return self.loss(z0, z1)
