"""k-means with faiss: plain (k-means++ seeded) and balanced (clusters of exactly ``n / k`` points).

The one home of clustering in ssroute: VQ codebook initialisation
(``ssroute.routing.vq``), super-classes of image routing
(``ssroute.objectives.superclass``) and the neuron groups of upcycling
(``ssroute.upcycle``) all call these.

- :func:`kmeans`: faiss k-means seeded with k-means++ (Arthur & Vassilvitskii
  2007), so well-separated groups each get a centroid;
- :func:`balanced_kmeans`: MoEfication's (Zhang et al. 2022) balanced k-means —
  faiss k-means gives the initial centroids, then a few balanced Lloyd rounds
  alternate an exact balanced assignment (every centroid copied ``n / k`` times,
  points matched to the copies by ``scipy.optimize.linear_sum_assignment``) and
  a centroid update.

Shapes: points ``[n, d]`` -> assignment ``[n]`` (cluster ids), centroids ``[k, d]``.

>>> import torch
>>> assign, centroids = balanced_kmeans(torch.randn(12, 3), 4, seed=0)
>>> torch.bincount(assign, minlength=4).tolist(), tuple(centroids.shape)
([3, 3, 3, 3], (4, 3))
>>> points = torch.tensor([[0.0, 0], [0, 1], [10, 0], [10, 1]])
>>> assign, _ = kmeans(points, 2)
>>> assign[0] == assign[1] and assign[2] == assign[3] and assign[0] != assign[2]
tensor(True)
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from ssroute.errors import ConfigError

logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its instruction-set probing is not news
import faiss  # noqa: E402


def kmeans_plus_plus(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """``[k, d]`` initial centroids: each next one drawn with probability proportional to squared distance."""
    centroids = [points[rng.integers(len(points))]]
    nearest = ((points - centroids[0]) ** 2).sum(1)
    for _ in range(1, k):
        total = nearest.sum()
        pick = rng.choice(len(points), p=nearest / total) if total > 0 else rng.integers(len(points))
        centroids.append(points[pick])
        nearest = np.minimum(nearest, ((points - points[pick]) ** 2).sum(1))
    return np.stack(centroids)


def kmeans(points: Tensor, k: int, niter: int = 20, seed: int = 0, plus_plus: bool = True) -> tuple[Tensor, Tensor]:
    """Cluster ``points [n, d]`` into ``k`` clusters; returns ``(assign [n] long, centroids [k, d])`` on the CPU.

    Args:
        points: the vectors to cluster.
        k: number of clusters (at most ``n``).
        niter: Lloyd iterations of faiss k-means.
        seed: seeds the initial centroids.
        plus_plus: seed with k-means++; False = faiss's own random initial centroids
            (and its default subsampling of large point sets).
    """
    n = points.shape[0]
    if not 1 <= k <= n:
        raise ConfigError(f"k-means of {n} points into {k} clusters is impossible; use at most as many clusters (experts, codes) as points.")
    x = np.ascontiguousarray(points.detach().float().cpu().numpy())
    options = {"niter": niter, "seed": seed, "verbose": False, "min_points_per_centroid": 1, "gpu": faiss.get_num_gpus() > 0}
    if plus_plus:
        index = faiss.Kmeans(x.shape[1], k, max_points_per_centroid=1 << 30, **options)
        index.train(x, init_centroids=kmeans_plus_plus(x.astype(np.float64), k, np.random.default_rng(seed)).astype(np.float32))
    else:
        index = faiss.Kmeans(x.shape[1], k, **options)
        index.train(x)
    _, assign = index.index.search(x, 1)
    return torch.from_numpy(assign[:, 0].astype(np.int64)), torch.from_numpy(index.centroids.copy())


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
        seed: seeds the initial k-means.
    """
    n = points.shape[0]
    if k < 1 or n % k:
        raise ConfigError(f"balanced k-means: num_experts={k} does not divide the {n} points (hidden neurons); choose a divisor of {n}.")
    x = np.ascontiguousarray(points.detach().cpu().double().numpy())
    if k == 1:
        return torch.zeros(n, dtype=torch.long), torch.from_numpy(x.mean(0, keepdims=True)).to(points.dtype)
    _, initial = kmeans(points, k, niter, seed, plus_plus=False)
    centroids = initial.double().numpy()
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
