"""BYOL (Grill et al. 2020, arXiv 2006.07733): predict an EMA teacher's projection of the other view.

>>> import torch
>>> from torch import nn
>>> from ssroute.config import SSLConfig
>>> encoder = nn.Linear(8, 16)
>>> objective = BYOL(encoder=encoder, dim=16, cfg=SSLConfig(proj_hidden=32, proj_dim=8))
>>> views = [torch.randn(4, 8), torch.randn(4, 8)]
>>> objective([encoder(v) for v in views], views, encoder).shape
torch.Size([])
"""

from __future__ import annotations

import torch
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules.heads import BYOLPredictionHead, BYOLProjectionHead
from torch import nn

from ssroute.objectives.base import OBJECTIVES, MomentumTeacher, SSLObjective


@OBJECTIVES.register("byol")
class BYOL(SSLObjective):
    """Projection and prediction heads, a momentum teacher, symmetric negative cosine loss.

    Args:
        encoder: the module being trained; its copy becomes the teacher.
        dim: encoder feature width.
        cfg: ``proj_hidden``, ``proj_dim`` and ``momentum`` of an :class:`SSLConfig`.
    """

    def __init__(self, encoder: nn.Module, dim: int, cfg) -> None:
        super().__init__()
        make_projection = lambda: BYOLProjectionHead(dim, cfg.proj_hidden, cfg.proj_dim)  # noqa: E731
        self.projection = make_projection()
        self.prediction = BYOLPredictionHead(cfg.proj_dim, cfg.proj_hidden, cfg.proj_dim)
        self.teacher = MomentumTeacher(encoder, self.projection, make_projection, cfg.momentum)
        self.loss = NegativeCosineSimilarity()

    def forward(self, features: list[torch.Tensor], views: list[torch.Tensor], encoder) -> torch.Tensor:
        p0, p1 = (self.prediction(self.projection(f)) for f in features[:2])
        t0, t1 = (self.teacher(v, encoder) for v in views[:2])
        return 0.5 * (self.loss(p0, t1) + self.loss(p1, t0))

    def on_step_end(self, encoder, progress: float) -> None:
        self.teacher.update(encoder, self.projection, progress)

    def start_phase(self, encoder) -> None:
        self.teacher.sync(encoder, self.projection)
