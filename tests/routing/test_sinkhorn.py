"""Sinkhorn normalisation converges to the requested marginals."""

from __future__ import annotations

import torch

from ssroute.routing.sinkhorn import sinkhorn


def _column_error(plan: torch.Tensor, target: float) -> float:
    return (plan.sum(1) - target).abs().max().item()


def test_marginals_converge() -> None:
    torch.manual_seed(0)
    scores = 3 * torch.randn(4, 12, 3)
    errors = [_column_error(sinkhorn(scores, iters), 12 / 3) for iters in (1, 5, 50, 300)]
    assert errors[-1] < 1e-3
    assert errors[0] > errors[1] > errors[2] >= errors[3]
    plan = sinkhorn(scores, 300)
    assert torch.allclose(plan.sum(-1), torch.ones(4, 12), atol=1e-5)
    assert bool((plan >= 0).all())


def test_custom_column_mass_and_large_scores_stay_finite() -> None:
    assert bool(torch.isfinite(sinkhorn(1e4 * torch.randn(2, 10, 5), 20)).all())  # log space: no overflow
    plan = sinkhorn(torch.randn(2, 10, 4), 300, col_mass=2.5)
    assert _column_error(plan, 2.5) < 1e-3


def test_balancing_preserves_preference_order_within_a_token() -> None:
    scores = torch.randn(1, 8, 4)
    plan = sinkhorn(scores, 20)
    # the plan is diag(a) exp(s) diag(b): per token, ratios between experts are scaled by b only
    ratio = plan[0] / scores[0].exp()
    assert torch.allclose(ratio / ratio[:, :1], (ratio / ratio[:, :1])[0:1].expand(8, 4), rtol=1e-4)
