"""The SSL objective interface and its registry.

An objective owns its heads (and, for momentum methods, a teacher copy of the
trainable part of the encoder) and turns the student's pooled features of
several views into one scalar loss. The training step runs the encoder once per
view and hands the objective the features; the encoder is passed along rather
than owned, so the same objective can train a whole ViT or, layerwise, one stage
on the frozen output of the stages below.

An encoder is a callable ``view -> (features [batch, dim], aux)`` (a backbone
or ``ssroute.train.schedule.StageEncoder``) or a plain module ``view -> features``.
An encoder with a ``segment()`` method names the modules that train; a momentum
teacher copies only those and runs them on the encoder's own frozen prefix
(``encoder(view, segment=copy)``), so student and teacher always see the same
frozen-prefix outputs.

Shapes: ``features``: ``num_views`` x ``[batch, dim]``; ``objective(features, views, encoder) -> []``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from lightly.models.utils import deactivate_requires_grad, update_momentum
from torch import nn

from ssroute.registry import Registry

OBJECTIVES: Registry = Registry("SSL objective")


class SSLObjective(nn.Module):
    """Base class: subclasses implement :meth:`forward`; momentum methods use :class:`MomentumTeacher`."""

    num_views: int = 2

    def forward(self, features: list[torch.Tensor], views: list[torch.Tensor], encoder) -> torch.Tensor:  # pragma: no cover - abstract
        """The loss of the student's ``features`` of ``views`` (``encoder``: for a teacher to run its copy)."""
        raise NotImplementedError

    def on_step_end(self, encoder, progress: float) -> None:
        """Called after each optimiser step; ``progress`` runs from 0 to 1 over the phase that trains ``encoder``."""

    def start_phase(self, encoder) -> None:
        """Called at the first step of the phase that trains ``encoder`` (a momentum teacher starts as the student)."""


def features_of(output) -> torch.Tensor:
    """The features of an encoder's output: ``(features, aux)`` or a plain tensor."""
    return output[0] if isinstance(output, tuple) else output


def trainable_part(encoder) -> nn.Module:
    """The modules of ``encoder`` that train (its ``segment()``; the whole module for a plain one)."""
    return encoder.segment() if hasattr(encoder, "segment") else encoder


class MomentumTeacher(nn.Module):
    """An EMA copy of the encoder's trainable part followed by ``head`` (BYOL, DINO; no head for the routing
    teacher of the consistency loss), updated without autograd.

    The teacher owns copies of the modules that train and nothing else: the
    frozen prefix below them is the student's own, shared, so it can never go
    stale. It always runs in eval mode (no router noise, no codebook updates);
    buffers such as an EMA codebook follow the student's. The momentum follows
    lightly's cosine schedule from ``momentum`` at the start of the phase to 1
    at its end, as in BYOL (Grill et al. 2020).
    """

    def __init__(self, encoder, student_head: nn.Module | None, make_head: Callable[[], nn.Module] | None, momentum: float) -> None:
        super().__init__()
        self.encoder = copy.deepcopy(trainable_part(encoder))
        # A fresh head with the student's weights: heads with weight norm (DINO) cannot be deep-copied.
        self.head = nn.Identity() if make_head is None else make_head()
        if student_head is not None:
            self.head.load_state_dict(student_head.state_dict())
        self.base_momentum = momentum
        deactivate_requires_grad(self)
        self.train(False)

    def train(self, mode: bool = True) -> MomentumTeacher:
        return super().train(False)  # never in training mode, whatever the training loop asks

    @torch.no_grad()
    def forward(self, view: torch.Tensor, encoder) -> torch.Tensor:
        output = encoder(view, segment=self.encoder) if hasattr(encoder, "segment") else self.encoder(view)
        return self.head(features_of(output))

    @torch.no_grad()
    def sync(self, encoder, head: nn.Module | None = None) -> None:
        """Become a copy of the student's trainable part and head (None: a teacher without a head)."""
        self.encoder.load_state_dict(trainable_part(encoder).state_dict())
        if head is not None:
            self.head.load_state_dict(head.state_dict())

    @torch.no_grad()
    def update(self, encoder, head: nn.Module | None, progress: float) -> None:
        momentum = 1.0 - (1.0 - self.base_momentum) * (math.cos(math.pi * min(progress, 1.0)) + 1.0) / 2.0
        student = trainable_part(encoder)
        update_momentum(student, self.encoder, momentum)
        if head is not None:
            update_momentum(head, self.head, momentum)
        for mine, theirs in zip(self.encoder.buffers(), student.buffers(), strict=True):
            mine.copy_(theirs)


def build_objective(name: str, encoder: nn.Module, dim: int, cfg) -> SSLObjective:
    """Build the objective ``name`` for an encoder producing ``[batch, dim]`` features."""
    import ssroute.objectives  # noqa: F401  (registers every objective)
    from ssroute.errors import ConfigError
    from ssroute.registry import option_names

    factory = OBJECTIVES.get(name)
    options = dict(cfg.options)
    valid = option_names(factory, ("encoder", "dim", "cfg"))
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(
            f"ssl.options {options} do not fit the {name} objective (no option {', '.join(map(repr, unknown))}; valid: {', '.join(valid) or 'none'}); remove or rename them."
        )
    return factory(encoder=encoder, dim=dim, cfg=cfg, **options)
