"""Linear centred kernel alignment (Kornblith et al. 2019, arXiv 1905.00414).

``CKA(X, Y) = ||Yᵀ X||²_F / (||Xᵀ X||_F ||Yᵀ Y||_F)`` on column-centred
features ``X [examples, d1]``, ``Y [examples, d2]``: 1 when one representation
is an orthogonal transform and rescaling of the other, near 0 when unrelated.
The research notes ask whether blocks trained one after another, or two stacks
trained from different seeds, "reach the same conclusion"; CKA answers that
without needing the two to share a basis.

>>> import torch
>>> x = torch.randn(100, 8)
>>> q, _ = torch.linalg.qr(torch.randn(8, 8))
>>> round(linear_cka(x, 3 * x @ q), 4)
1.0
"""

from __future__ import annotations

import torch
from torch import Tensor


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA between ``[examples, d1]`` and ``[examples, d2]`` features."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs the same examples in both: got {x.shape[0]} and {y.shape[0]} rows")
    x = x.double() - x.double().mean(dim=0)
    y = y.double() - y.double().mean(dim=0)
    cross = (y.t() @ x).pow(2).sum()
    norm = torch.linalg.matrix_norm(x.t() @ x) * torch.linalg.matrix_norm(y.t() @ y)
    return float(cross / norm.clamp_min(1e-12))
