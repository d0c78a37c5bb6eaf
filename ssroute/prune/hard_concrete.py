"""Hard-concrete gates: differentiable L0 masks (Louizos, Welling and Kingma 2018, arXiv 1712.01312).

A gate ``z`` in ``[0, 1]`` per structure (a head, a hidden unit, a whole layer)
is a stretched, clipped binary concrete sample::

    u ~ U(0, 1),  s = sigmoid((log u - log(1 - u) + log_alpha) / beta)
    z = clamp(s * (zeta - gamma) + gamma, 0, 1)

with ``gamma = -0.1``, ``zeta = 1.1``; ``z`` is exactly 0 or 1 with non-zero
probability, and the expected L0 norm is differentiable in ``log_alpha``::

    P(z != 0) = sigmoid(log_alpha - beta * log(-gamma / zeta))

The temperature ``beta`` is the notes' ``l0_temperature``: a lower one makes
``P(z != 0)`` smaller at equal ``log_alpha``, so masks end sparser.
``droprate_init`` starts ``log_alpha`` at ``log((1 - p) / p)`` (CoFI, Xia et al.
2022, arXiv 2204.00408, whose defaults these are).

At evaluation the gate is deterministic, as in CoFI (and FLOP, Wang et al.
2020): in each row it keeps the ``round(sum P(z != 0))`` structures of largest
``log_alpha`` with value ``sigmoid(0.8 * log_alpha / beta)`` and zeroes the
rest, so the deterministic count equals the expected L0 up to rounding.
``binary=True`` keeps value 1 instead (used where a scale cannot be folded
into the weights: the experts of a bias-free router gate).

>>> import torch
>>> gate = HardConcrete(4, droprate_init=0.5)
>>> gate.train()().shape, float(gate.l0().detach()) > 3.0, gate.eval()().tolist() == gate.deterministic().tolist()
(torch.Size([4]), True, True)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ssroute.errors import ConfigError

GAMMA, ZETA, EPS = -0.1, 1.1, 1e-6
DETERMINISTIC_SCALE = 0.8  # CoFI's sharpening of the kept gates' values


class HardConcrete(nn.Module):
    """A ``[rows, size]`` (or ``[size]``) block of hard-concrete gates.

    Args:
        size: gates per row.
        rows: rows (e.g. one per block); None = a 1-D gate vector.
        temperature: ``beta`` (``l0_temperature``); lower = sparser.
        droprate_init: initial drop probability (``log_alpha = log((1-p)/p)``, plus N(0, 0.01) noise).
        binary: deterministic gates are exactly 0 or 1.
    """

    def __init__(
        self, size: int, rows: int | None = None, temperature: float = 2.0 / 3.0, droprate_init: float = 0.5, binary: bool = False
    ) -> None:
        super().__init__()
        if not 0.0 < droprate_init < 1.0:
            raise ConfigError(f"droprate_init={droprate_init} must be strictly between 0 and 1 (CoFI uses 0.5).")
        if temperature <= 0:
            raise ConfigError(f"l0_temperature={temperature} must be positive (CoFI uses 2/3; lower = sparser).")
        shape = (size,) if rows is None else (rows, size)
        mean = math.log(1.0 - droprate_init) - math.log(droprate_init)
        self.log_alpha = nn.Parameter(torch.empty(shape).normal_(mean, 1e-2))
        self.temperature, self.binary = float(temperature), binary

    @property
    def shape(self) -> torch.Size:
        return self.log_alpha.shape

    def prob_nonzero(self) -> Tensor:
        """``P(z != 0)`` per gate, differentiable in ``log_alpha``."""
        return torch.sigmoid(self.log_alpha - self.temperature * math.log(-GAMMA / ZETA))

    def l0(self) -> Tensor:
        """Expected number of non-zero gates (all rows together)."""
        return self.prob_nonzero().sum()

    def sample(self) -> Tensor:
        """One reparameterised sample of the gates (training)."""
        u = torch.empty_like(self.log_alpha).uniform_(EPS, 1.0 - EPS)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.temperature)
        return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)

    @torch.no_grad()
    def deterministic(self) -> Tensor:
        """The evaluation gates: per row the ``round(expected L0)`` largest ``log_alpha`` kept, the rest 0."""
        log_alpha = self.log_alpha.detach()
        rows = log_alpha.reshape(-1, log_alpha.shape[-1])
        kept = self.prob_nonzero().detach().reshape(rows.shape).sum(-1).round().long()
        rank = rows.argsort(dim=-1, descending=True).argsort(dim=-1)  # 0 = the largest log_alpha of its row
        keep = rank < kept.unsqueeze(-1)
        values = torch.ones_like(rows) if self.binary else torch.sigmoid(DETERMINISTIC_SCALE * rows / self.temperature)
        return torch.where(keep, values, torch.zeros_like(rows)).reshape(log_alpha.shape)

    def forward(self) -> Tensor:
        """A sample in training mode, the deterministic gates in eval mode."""
        return self.sample() if self.training else self.deterministic()
