"""Super-classes for image routing: classes (or images) clustered into one group per expert, and the router's loss.

Mobile V-MoE (Daxberger et al. 2023, arXiv 2309.04354) does not leave the
image router to find its own split: it clusters the classes into ``E``
super-classes from class-mean features of a trained model and trains the router
to predict each image's super-class (an auxiliary cross-entropy,
:func:`superclass_loss`, on the image distributions the forward returns).
Without labels, the images themselves are clustered (as DeepCluster, Caron et
al. 2018, trains on the k-means clusters of its own features).

- :func:`class_superclasses`: features ``[images, dim]`` + labels ``[images]`` ->
  super-class of each class ``[classes]`` (k-means of the class means);
- :func:`image_clusters`: features ``[images, dim]`` -> cluster of each image ``[images]``;
- :func:`align_clusters` / :func:`cluster_permutation`: relabel clusters to agree most with a reference
  assignment (the router's current top-1, or the previous clustering), so the
  ids the router is trained on do not permute arbitrarily;
- :func:`superclass_loss`: cross-entropy of every image router's distribution to the targets.

K-means is :func:`ssroute.kmeans.kmeans` (faiss, k-means++ seeding).

>>> import torch
>>> means = torch.tensor([[0.0, 0], [0, 1], [10, 0], [10, 1], [0, 10], [1, 10]])
>>> groups = class_superclasses(means, torch.arange(6), num_classes=6, num_superclasses=3)
>>> groups.view(3, 2)[:, 0].tolist() == groups.view(3, 2)[:, 1].tolist() and len(set(groups.tolist())) == 3
True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from ssroute.errors import ConfigError
from ssroute.kmeans import kmeans
from ssroute.routing import Routing
from ssroute.routing.image import ImageRouting


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


def superclass_loss(routings: dict[int, Routing], targets: Tensor, weight: float) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``({"superclass": weight x mean cross-entropy}, {"superclass_top1": accuracy})`` of every image router
    in ``routings`` against the super-class ids ``targets [images]``; two empty dicts when none routes images."""
    image_routings = [r for r in routings.values() if isinstance(r, ImageRouting)]
    if not image_routings:
        return {}, {}
    losses, hits = [], []
    for routing in image_routings:
        probs = routing.image_probs.float()
        if probs.shape[0] != targets.shape[0]:
            raise ValueError(f"super-class targets are for {targets.shape[0]} images but the forward routed {probs.shape[0]}")
        losses.append(F.nll_loss(probs.clamp_min(1e-8).log(), targets))
        hits.append((probs.detach().argmax(dim=-1) == targets).float().mean())
    return {"superclass": weight * torch.stack(losses).mean()}, {"superclass_top1": torch.stack(hits).mean()}
