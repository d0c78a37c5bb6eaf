"""Balanced k-means: ``n`` points into ``k`` clusters of exactly ``n / k`` points each.

MoEfication (Zhang et al. 2022, "MoEfication: Transformer Feed-forward Layers
are Mixtures of Experts") splits a dense FFN's hidden neurons into experts of
equal size by clustering the neurons' input weight vectors with balanced
k-means. Here: faiss k-means gives the initial centroids, then a few balanced
Lloyd rounds alternate

- a **balanced assignment**: every centroid is copied ``n / k`` times and the
  points are matched to the copies by an exact minimum-cost assignment
  (``scipy.optimize.linear_sum_assignment``), so sizes are equal by
  construction and the total squared distance is the least possible for them;
- a centroid update (the mean of each cluster).

Shapes: points ``[n, d]`` -> assignment ``[n]`` (cluster ids), centroids ``[k, d]``.

>>> import torch
>>> assign, centroids = balanced_kmeans(torch.randn(12, 3), 4, seed=0)
>>> torch.bincount(assign, minlength=4).tolist(), tuple(centroids.shape)
([3, 3, 3, 3], (4, 3))
"""

from __future__ import annotations

import faiss
import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from ssroute.errors import ConfigError


def balanced_assignment(points: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """``[n]`` cluster of each point, each of the ``k`` clusters getting exactly ``n / k`` points."""
    n, k = points.shape[0], centroids.shape[0]
    size = n // k
    cost = ((points[:, None, :] - centroids[None, :, :]) ** 2).sum(-1)  # [n, k]
    rows, cols = linear_sum_assignment(np.repeat(cost, size, axis=1))  # [n, k * size]: each centroid offers `size` seats
    assign = np.empty(n, dtype=np.int64)
    assign[rows] = cols // size
    return assign


def balanced_kmeans(points: Tensor, k: int, niter: int = 20, rounds: int = 5, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Cluster ``points [n, d]`` into ``k`` equal clusters; returns ``(assign [n] long, centroids [k, d])``.

    Args:
        points: the vectors to cluster (for MoEfication, one row per hidden neuron).
        k: number of clusters; must divide ``n``.
        niter: faiss k-means iterations for the initial centroids.
        rounds: balanced assignment + centroid update rounds after that.
        seed: faiss k-means seed.
    """
    n = points.shape[0]
    if k < 1 or n % k:
        raise ConfigError(f"balanced k-means: num_experts={k} does not divide the {n} points (hidden neurons); choose a divisor of {n}.")
    x = np.ascontiguousarray(points.detach().cpu().double().numpy())
    if k == 1:
        return torch.zeros(n, dtype=torch.long), torch.from_numpy(x.mean(0, keepdims=True)).to(points.dtype)
    kmeans = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, verbose=False, min_points_per_centroid=1)
    kmeans.train(x.astype(np.float32))
    centroids = kmeans.centroids.astype(np.float64)
    assign = balanced_assignment(x, centroids)
    for _ in range(rounds):
        centroids = np.stack([x[assign == c].mean(0) for c in range(k)])
        new = balanced_assignment(x, centroids)
        if np.array_equal(new, assign):
            break
        assign = new
    centroids = np.stack([x[assign == c].mean(0) for c in range(k)])
    return torch.from_numpy(assign), torch.from_numpy(centroids).to(points.dtype)


def groups_of(assign: Tensor, k: int) -> Tensor:
    """``[k, n / k]`` member indices of each cluster (ascending), from an assignment of equal clusters."""
    order = torch.argsort(assign * assign.numel() + torch.arange(assign.numel()), stable=True)
    return order.view(k, -1)
