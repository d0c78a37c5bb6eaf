"""Linear probe: multinomial logistic regression on frozen, standardised features.

The regularisation strength is chosen on a held-out tenth of the training
features from a small grid, then the probe is refit on all of them — so the
reported accuracy never sees the test set during selection.

>>> import torch
>>> g = torch.Generator().manual_seed(0)
>>> x = torch.randn(200, 5, generator=g); y = (x[:, 0] > 0).long()
>>> linear_probe_accuracy(x[:150], y[:150], x[150:], y[150:]) > 0.9
True
"""

from __future__ import annotations

import numpy as np
import torch


def linear_probe_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    grid: tuple[float, ...] = (0.1, 1.0, 10.0),
    seed: int = 0,
) -> float:
    """Top-1 test accuracy of the best-regularised logistic regression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x_train = train_features.float().cpu().numpy()
    y_train = train_labels.cpu().numpy()
    scaler = StandardScaler().fit(x_train)
    x_train = scaler.transform(x_train)
    x_test = scaler.transform(test_features.float().cpu().numpy())
    order = np.random.default_rng(seed).permutation(len(x_train))
    held = order[: max(1, len(order) // 10)]
    fit = order[len(held) :]

    def model(c: float) -> LogisticRegression:
        return LogisticRegression(C=c, max_iter=1000, tol=1e-3)

    best_c = grid[0]
    if len(grid) > 1:
        scores = [model(c).fit(x_train[fit], y_train[fit]).score(x_train[held], y_train[held]) for c in grid]
        best_c = grid[int(np.argmax(scores))]
    return float(model(best_c).fit(x_train, y_train).score(x_test, test_labels.cpu().numpy()))
