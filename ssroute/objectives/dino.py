"""DINO (Caron et al. 2021, arXiv 2104.14294): self-distillation with a centred, sharpened EMA teacher.

Options (``ssl.options``): ``prototypes`` (output width, default 1024),
``teacher_temp`` (default 0.04), ``warmup_teacher_temp_epochs`` (default 0).

>>> import torch
>>> from torch import nn
>>> from ssroute.config import SSLConfig
>>> encoder = nn.Linear(8, 16)
>>> objective = DINO(encoder=encoder, dim=16, cfg=SSLConfig(proj_hidden=32, proj_dim=8), prototypes=64)
>>> views = [torch.randn(4, 8), torch.randn(4, 8)]
>>> objective([encoder(v) for v in views], views, encoder).shape
torch.Size([])
"""

from __future__ import annotations

import torch
from lightly.loss import DINOLoss
from lightly.models.modules.heads import DINOProjectionHead
from torch import nn

from ssroute.objectives.base import OBJECTIVES, MomentumTeacher, SSLObjective


@OBJECTIVES.register("dino")
class DINO(SSLObjective):
    """DINO head, momentum teacher, lightly's DINO loss over two global views.

    Args:
        encoder: the module being trained; its copy becomes the teacher.
        dim: encoder feature width.
        cfg: ``proj_hidden`` (head hidden width), ``proj_dim`` (bottleneck),
            ``temperature`` (student temperature) and ``momentum``.
        prototypes: width of the head's output (the number of prototypes).
        teacher_temp: teacher temperature after warmup.
        warmup_teacher_temp_epochs: epochs of teacher temperature warmup from 0.04.
    """

    def __init__(self, encoder: nn.Module, dim: int, cfg, prototypes: int = 1024, teacher_temp: float = 0.04, warmup_teacher_temp_epochs: int = 0) -> None:
        super().__init__()
        make_head = lambda: DINOProjectionHead(dim, cfg.proj_hidden, cfg.proj_dim, prototypes)  # noqa: E731
        self.head = make_head()
        self.teacher = MomentumTeacher(encoder, self.head, make_head, cfg.momentum)
        self.loss = DINOLoss(
            output_dim=prototypes,
            warmup_teacher_temp=min(0.04, teacher_temp),
            teacher_temp=teacher_temp,
            warmup_teacher_temp_epochs=warmup_teacher_temp_epochs,
            student_temp=cfg.temperature,
        )
        self.epoch = 0

    def forward(self, features: list[torch.Tensor], views: list[torch.Tensor], encoder) -> torch.Tensor:
        teacher_out = [self.teacher(v, encoder) for v in views[:2]]
        student_out = [self.head(f) for f in features]
        return self.loss(teacher_out, student_out, epoch=self.epoch)

    def on_step_end(self, encoder, progress: float) -> None:
        self.teacher.update(encoder, self.head, progress)

    def start_phase(self, encoder) -> None:
        self.teacher.sync(encoder, self.head)
