"""The SSL objective interface and its registry.

An objective owns its heads (and, for momentum methods, a teacher copy of the
encoder) and turns the encoder's pooled features of several views into one
scalar loss. The encoder is passed in rather than owned, so the same objective
can train a whole ViT or, layerwise, one block on frozen inputs.

Shapes: ``encoder(view) -> [batch, dim]``; ``objective(encoder, views) -> []``.
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

    def forward(self, encoder: nn.Module, views: list[torch.Tensor]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def on_step_end(self, encoder: nn.Module, progress: float) -> None:
        """Called after each optimiser step; ``progress`` runs from 0 to 1 over training."""


class MomentumTeacher(nn.Module):
    """An EMA copy of ``encoder`` followed by ``head`` (BYOL, DINO), updated without autograd.

    The momentum follows lightly's cosine schedule from ``momentum`` at the start
    to 1 at the end of training, as in BYOL (Grill et al. 2020).
    """

    def __init__(self, encoder: nn.Module, student_head: nn.Module, make_head: Callable[[], nn.Module], momentum: float) -> None:
        super().__init__()
        self.encoder = copy.deepcopy(encoder)
        # A fresh head with the student's weights: heads with weight norm (DINO) cannot be deep-copied.
        self.head = make_head()
        self.head.load_state_dict(student_head.state_dict())
        self.base_momentum = momentum
        deactivate_requires_grad(self)

    @torch.no_grad()
    def forward(self, view: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(view))

    @torch.no_grad()
    def update(self, encoder: nn.Module, head: nn.Module, progress: float) -> None:
        momentum = 1.0 - (1.0 - self.base_momentum) * (math.cos(math.pi * min(progress, 1.0)) + 1.0) / 2.0
        update_momentum(encoder, self.encoder, momentum)
        update_momentum(head, self.head, momentum)


def build_objective(name: str, encoder: nn.Module, dim: int, cfg) -> SSLObjective:
    """Build the objective ``name`` for an encoder producing ``[batch, dim]`` features."""
    import ssroute.objectives  # noqa: F401  (registers every objective)

    factory = OBJECTIVES.get(name)
    try:
        return factory(encoder=encoder, dim=dim, cfg=cfg, **dict(cfg.options))
    except TypeError as err:
        from ssroute.errors import ConfigError

        raise ConfigError(f"ssl.options {dict(cfg.options)} do not fit the {name} objective ({err}); remove or rename them.") from None
