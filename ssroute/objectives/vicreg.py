"""VICReg (Bardes et al. 2022, arXiv 2105.04906): invariance, variance and covariance terms.

Options (``ssl.options``): ``lambda_param``, ``mu_param``, ``nu_param`` (lightly's defaults 25, 25, 1).

>>> import torch
>>> from torch import nn
>>> from ssroute.config import SSLConfig
>>> encoder = nn.Linear(8, 16)
>>> objective = VICReg(encoder=encoder, dim=16, cfg=SSLConfig(proj_hidden=32, proj_dim=8))
>>> views = [torch.randn(4, 8), torch.randn(4, 8)]
>>> objective([encoder(v) for v in views], views, encoder).shape
torch.Size([])
"""

from __future__ import annotations

import torch
from lightly.loss import VICRegLoss
from lightly.models.modules.heads import VICRegProjectionHead
from torch import nn

from ssroute.objectives.base import OBJECTIVES, SSLObjective


@OBJECTIVES.register("vicreg")
class VICReg(SSLObjective):
    """Expander head + lightly's VICReg loss (gathered across DDP ranks).

    Args:
        encoder: the module being trained (unused; VICReg has no teacher).
        dim: encoder feature width.
        cfg: ``proj_hidden`` and ``proj_dim`` of an :class:`SSLConfig`.
        lambda_param: invariance weight.
        mu_param: variance weight.
        nu_param: covariance weight.
    """

    def __init__(self, encoder: nn.Module, dim: int, cfg, lambda_param: float = 25.0, mu_param: float = 25.0, nu_param: float = 1.0) -> None:
        super().__init__()
        self.head = VICRegProjectionHead(dim, cfg.proj_hidden, cfg.proj_dim, num_layers=2)
        self.loss = VICRegLoss(lambda_param=lambda_param, mu_param=mu_param, nu_param=nu_param, gather_distributed=True)

    def forward(self, features: list[torch.Tensor], views: list[torch.Tensor], encoder) -> torch.Tensor:
        z0, z1 = (self.head(f) for f in features[:2])
        return self.loss(z0, z1)
