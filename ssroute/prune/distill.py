"""Distillation losses of CoFI (Xia et al. 2022, arXiv 2204.00408), as pure functions.

- :func:`output_loss`: the prediction layer — KL between temperature-softened
  class distributions (Hinton et al. 2015, scaled by ``T^2``), or MSE; on an
  unlabelled model the pooled features take the logits' place;
- :func:`hidden_loss`: one representation against another, ``[batch, tokens, dim]``:
  MSE, or KL between per-token softmaxes over the feature axis (the notes'
  "compare mse vs kl in layers and logits");
- :func:`layer_alignment` / :func:`layerwise_loss`: CoFI's layer matching
  (its ``layer_distill_version=4``): every chosen teacher layer is matched to
  the student layer whose (linearly transformed) output is closest, searching
  from the last layer down so the matching keeps the order, and skipping
  student layers whose attention is pruned away — the student may lose layers
  and still be taught by every teacher layer;
- :func:`sublayer_losses`: the attention-output and FFN-output losses of each
  block, kept separate (the notes' answer to "distillation loss going up").

>>> import torch
>>> t = torch.randn(4, 10)
>>> float(output_loss(t, t, "kl")) == 0.0, float(output_loss(t + 1, t, "mse"))
(True, 1.0)
>>> losses = torch.tensor([[0.1, 5.0, 5.0], [5.0, 5.0, 0.2], [5.0, 0.3, 5.0]])  # [teacher layers, student layers]
>>> layer_alignment(losses).tolist()  # teacher 2 takes student 1; teacher 1 must then match below it
[0, 0, 1]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ssroute.errors import ConfigError

KINDS = ("mse", "kl")


def check_kind(key: str, kind: str) -> None:
    if kind not in KINDS:
        raise ConfigError(f"{key}={kind!r} is not a distillation loss; choose mse or kl.")


def output_loss(student: Tensor, teacher: Tensor, kind: str = "kl", temperature: float = 2.0) -> Tensor:
    """``[batch, classes]`` logits (or ``[batch, dim]`` features): ``T^2 KL(teacher_T || student_T)`` or MSE."""
    if kind == "mse":
        return F.mse_loss(student, teacher)
    log_student = F.log_softmax(student / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher / temperature, dim=-1)
    return F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean") * temperature**2


def hidden_loss(student: Tensor, teacher: Tensor, kind: str = "mse", temperature: float = 1.0) -> Tensor:
    """``[..., dim]`` representations: mean squared error, or KL between per-row softmaxes over ``dim``."""
    if kind == "mse":
        return F.mse_loss(student, teacher)
    rows = student.shape[-1]
    log_student = F.log_softmax(student.reshape(-1, rows) / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher.reshape(-1, rows) / temperature, dim=-1)
    return F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean") * temperature**2


def layer_alignment(losses: Tensor, allowed: Tensor | None = None) -> Tensor:
    """``[teacher layers]`` student layer matched to each teacher layer, from ``losses [teacher, student]``.

    From the last teacher layer down, each takes the student layer of smallest
    loss among those below the previous match (and ``allowed``); a teacher layer
    with no candidate reuses the previous match (CoFI's rule).
    """
    teachers, students = losses.shape
    allowed = torch.ones(students, dtype=torch.bool) if allowed is None else allowed.cpu()
    detached = losses.detach().cpu()
    alignment, limit = [], students
    for t in range(teachers - 1, -1, -1):
        candidates = [s for s in detached[t].argsort().tolist() if s < limit and bool(allowed[s])]
        limit = candidates[0] if candidates else min(limit, students - 1)
        alignment.append(limit)
    return torch.tensor(alignment[::-1], dtype=torch.long, device=losses.device)


def layerwise_loss(
    student_layers: list[Tensor], teacher_layers: list[Tensor], kind: str = "mse", allowed: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(sum over teacher layers of the loss to their matched student layer, the alignment).

    ``student_layers``: the student's block outputs, already through the learned
    transform; ``teacher_layers``: the teacher's (all of them, or a chosen subset).
    """
    losses = torch.stack([torch.stack([hidden_loss(s, t, kind) for s in student_layers]) for t in teacher_layers])
    alignment = layer_alignment(losses, allowed)
    return losses[torch.arange(len(teacher_layers), device=losses.device), alignment].sum(), alignment


def sublayer_losses(student: list[Tensor], teacher: list[Tensor], kind: str = "mse") -> Tensor:
    """``[blocks]`` loss of each block's sublayer output (attention or FFN) against the teacher's same block."""
    return torch.stack([hidden_loss(s, t, kind) for s, t in zip(student, teacher, strict=True)])
