"""Sinkhorn normalisation: the balanced (equipartition) transport plan.

Shared by sinkhorn token choice (Clark et al. 2022, "Unified Scaling Laws for
Routed Language Models"), sinkhorn expert choice (Liu et al. 2024, arXiv
2401.15969) and the approximate solver of the Hungarian set-matching router.
It is the same equipartition step SwAV uses to balance prototypes.

Given scores ``[groups, tokens, experts]``, find the plan
``P = diag(a) exp(scores / temperature) diag(b)`` whose rows sum to 1 (each
token is fully routed) and whose columns sum to ``col_mass`` (``tokens /
experts`` by default: every expert receives the same share). Iterations run in
log space, so large scores cannot overflow.

>>> import torch
>>> plan = sinkhorn(torch.randn(2, 6, 3), num_iters=50)
>>> torch.allclose(plan.sum(-1), torch.ones(2, 6)), torch.allclose(plan.sum(1), torch.full((2, 3), 2.0), atol=1e-3)
(True, True)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def sinkhorn(scores: Tensor, num_iters: int = 10, temperature: float = 1.0, col_mass: float | None = None) -> Tensor:
    """Balanced transport plan ``[groups, tokens, experts]`` (rows sum to 1).

    Args:
        scores: ``[groups, tokens, experts]`` affinities (higher = preferred).
        num_iters: alternating column/row normalisations; a fixed count keeps
            the step free of host syncs.
        temperature: divides the scores; lower is closer to a hard assignment.
        col_mass: target column sums; defaults to ``tokens / experts``.
    """
    _, tokens, experts = scores.shape
    log_col = math.log(col_mass if col_mass is not None else tokens / experts)
    log_plan = scores.float() / temperature
    log_plan = log_plan - torch.logsumexp(log_plan, dim=2, keepdim=True)
    for _ in range(num_iters):
        log_plan = log_plan - torch.logsumexp(log_plan, dim=1, keepdim=True) + log_col
        log_plan = log_plan - torch.logsumexp(log_plan, dim=2, keepdim=True)
    return log_plan.exp().to(scores.dtype)
