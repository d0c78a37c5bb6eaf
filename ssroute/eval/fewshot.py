"""Few-shot classification on frozen features: ``n`` labelled images per class, averaged over seeded draws.

The classifier is the nearest class mean on centred, L2-normalised features
(SimpleShot "CL2N", Wang et al. 2019, arXiv 1911.04623): subtract the mean of
all training features (no labels needed), normalise, average the ``n`` support
features of each class into a prototype, and give each test image the class of
the most cosine-similar prototype. SimpleShot shows this matches far heavier
few-shot learners; unlike the linear probe it has no regularisation strength to
choose, which one labelled image per class could not do honestly.

``support [images, dim]`` (with labels) is the labelled pool the draws come from;
``query [queries, dim]`` the test features.

>>> import torch
>>> support = torch.tensor([[1.0, 0.0], [2.0, 0.1], [0.0, 1.0], [0.1, 3.0]])
>>> labels = torch.tensor([0, 0, 1, 1])
>>> query, query_labels = torch.tensor([[5.0, 0.2], [0.3, 4.0]]), torch.tensor([0, 1])
>>> prototype_accuracy(support, labels, query, query_labels, centre=torch.zeros(2))
1.0
>>> fewshot_accuracy(support, labels, query, query_labels, shots=[1], draws=3)
{'fewshot/1shot_top1': 1.0, 'fewshot/1shot_top1_std': 0.0}
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def prototype_accuracy(
    support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, query_labels: torch.Tensor, centre: torch.Tensor
) -> float:
    """Top-1 accuracy of the nearest class mean (cosine, after subtracting ``centre [dim]``)."""
    num_classes = int(max(support_labels.max(), query_labels.max())) + 1
    support = F.normalize(support.float() - centre, dim=1)
    sums = torch.zeros(num_classes, support.shape[1]).index_add_(0, support_labels, support)
    counts = torch.bincount(support_labels, minlength=num_classes)
    prototypes = F.normalize(sums, dim=1)  # the direction of the class mean; absent classes stay zero
    scores = F.normalize(query.float() - centre, dim=1) @ prototypes.T  # [queries, classes]
    scores[:, counts == 0] = -float("inf")
    return float((scores.argmax(dim=1) == query_labels).float().mean())


def draw_support(labels: np.ndarray, shots: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``shots`` images of every class (all of a class that has fewer)."""
    return np.concatenate([rng.choice(members, size=min(shots, len(members)), replace=False) for members in _by_class(labels)])


def _by_class(labels: np.ndarray) -> list[np.ndarray]:
    return [np.flatnonzero(labels == c) for c in np.unique(labels)]


def fewshot_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    shots: list[int],
    draws: int = 5,
    seed: int = 0,
) -> dict[str, float]:
    """Mean and std of :func:`prototype_accuracy` over ``draws`` seeded supports, per entry of ``shots``.

    Keys ``fewshot/{n}shot_top1`` and ``fewshot/{n}shot_top1_std`` (population std over the draws).
    """
    train_features, test_features = train_features.float().cpu(), test_features.float().cpu()
    train_labels, test_labels = train_labels.long().cpu(), test_labels.long().cpu()
    centre = train_features.mean(dim=0)
    labels_np = train_labels.numpy()
    metrics: dict[str, float] = {}
    for n in shots:
        rng = np.random.default_rng([seed, n])  # the same supports whatever other n are asked for
        scores = []
        for _ in range(draws):
            pick = torch.from_numpy(draw_support(labels_np, n, rng))
            scores.append(prototype_accuracy(train_features[pick], train_labels[pick], test_features, test_labels, centre))
        metrics[f"fewshot/{n}shot_top1"] = float(np.mean(scores))
        metrics[f"fewshot/{n}shot_top1_std"] = float(np.std(scores))
    return metrics
