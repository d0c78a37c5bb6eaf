"""Super-classes for image routing: classes (or images) clustered into one group per expert.

Mobile V-MoE (Daxberger et al. 2023, arXiv 2309.04354) does not leave the
image router to find its own split: it clusters the classes into ``E``
super-classes from class-mean features of a trained model and trains the router
to predict each image's super-class (an auxiliary cross-entropy, see
``ssroute.routing.image.ImageRouter.set_superclass_targets``). Without labels,
the images themselves are clustered (as DeepCluster, Caron et al. 2018, trains
on the k-means clusters of its own features).

- :func:`class_superclasses`: features ``[images, dim]`` + labels ``[images]`` ->
  super-class of each class ``[classes]`` (k-means of the class means);
- :func:`image_clusters`: features ``[images, dim]`` -> cluster of each image ``[images]``;
- :func:`align_clusters` / :func:`cluster_permutation`: relabel clusters to agree most with a reference
  assignment (the router's current top-1, or the previous clustering), so the
  ids the router is trained on do not permute arbitrarily.

K-means is faiss's (as in ``ssroute.experts.kmeans``), seeded with k-means++
(Arthur & Vassilvitskii 2007) so well-separated groups each get a centroid.

>>> import torch
>>> means = torch.tensor([[0.0, 0], [0, 1], [10, 0], [10, 1], [0, 10], [1, 10]])
>>> groups = class_superclasses(means, torch.arange(6), num_classes=6, num_superclasses=3)
>>> groups.view(3, 2)[:, 0].tolist() == groups.view(3, 2)[:, 1].tolist() and len(set(groups.tolist())) == 3
True
"""

from __future__ import annotations

import faiss
import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from ssroute.errors import ConfigError


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


def kmeans(points: Tensor, k: int, niter: int = 20, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Cluster ``points [n, d]`` into ``k`` clusters; returns ``(assign [n] long, centroids [k, d])``.

    Args:
        points: the vectors to cluster.
        k: number of clusters (at most ``n``).
        niter: Lloyd iterations of faiss k-means after the k-means++ seeding.
        seed: seeds the k-means++ draw.
    """
    n = points.shape[0]
    if not 1 <= k <= n:
        raise ConfigError(
            f"k-means of {n} points into {k} clusters is impossible; use at most as many experts as points (classes or images)."
        )
    x = np.ascontiguousarray(points.detach().float().cpu().numpy())
    init = kmeans_plus_plus(x.astype(np.float64), k, np.random.default_rng(seed)).astype(np.float32)
    index = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, verbose=False, min_points_per_centroid=1, max_points_per_centroid=1 << 30)
    index.train(x, init_centroids=init)
    _, assign = index.index.search(x, 1)
    return torch.from_numpy(assign[:, 0].astype(np.int64)), torch.from_numpy(index.centroids.copy())


def class_superclasses(features: Tensor, labels: Tensor, num_classes: int, num_superclasses: int, niter: int = 20, seed: int = 0) -> Tensor:
    """``[classes]`` super-class of each class: k-means of the class-mean features (Mobile V-MoE).

    Args:
        features: ``[images, dim]`` features of a trained model.
        labels: ``[images]`` class of each image, in ``0..num_classes-1``.
        num_classes: number of classes (every one must have an image).
        num_superclasses: number of super-classes, one per expert.
        niter, seed: as for :func:`kmeans`.
    """
    counts = torch.bincount(labels, minlength=num_classes)
    if bool((counts == 0).any()):
        missing = (counts == 0).nonzero().flatten().tolist()
        raise ConfigError(f"classes {missing} have no image to average for super-classes; use a training set with every class.")
    sums = torch.zeros(num_classes, features.shape[1], dtype=torch.float64).index_add_(0, labels.cpu(), features.double().cpu())
    assign, _ = kmeans(sums / counts.cpu().unsqueeze(1), num_superclasses, niter, seed)
    return assign


def image_clusters(features: Tensor, num_clusters: int, niter: int = 20, seed: int = 0) -> Tensor:
    """``[images]`` cluster of each image: k-means of the images' features (super-classes without labels)."""
    assign, _ = kmeans(features, num_clusters, niter, seed)
    return assign


def cluster_permutation(assign: Tensor, reference: Tensor, k: int) -> Tensor:
    """``[k]`` new id of each cluster of ``assign [n]``: the permutation that agrees most with ``reference [n]`` (Hungarian)."""
    overlap = torch.bincount(assign.cpu() * k + reference.cpu(), minlength=k * k).view(k, k)
    rows, cols = linear_sum_assignment(overlap.numpy(), maximize=True)
    relabel = torch.empty(k, dtype=torch.long)
    relabel[torch.from_numpy(rows)] = torch.from_numpy(cols)
    return relabel.to(assign.device)


def align_clusters(assign: Tensor, reference: Tensor, k: int) -> Tensor:
    """Relabel ``assign [n]`` by the permutation of ``0..k-1`` that agrees most with ``reference [n]``.

    >>> align_clusters(torch.tensor([2, 2, 0, 1]), torch.tensor([0, 0, 1, 2]), 3).tolist()
    [0, 0, 1, 2]
    """
    return cluster_permutation(assign, reference, k)[assign]
