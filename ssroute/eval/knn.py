"""Weighted k-nearest-neighbour classification on frozen features, with faiss.

As DINO evaluates (Caron et al. 2021; Wu et al. 2018): cosine similarity to the
``k`` nearest training features, each neighbour votes for its class with weight
``exp(similarity / temperature)``. Uses a GPU index when faiss sees a GPU.

>>> import torch
>>> train = torch.eye(4).repeat(5, 1); labels = torch.arange(4).repeat(5)
>>> float(knn_accuracy(train, labels, torch.eye(4), torch.arange(4), k=5))
1.0
"""

from __future__ import annotations

import logging

import numpy as np
import torch

logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its instruction-set probing is not news
import faiss  # noqa: E402


def _index(dim: int) -> faiss.Index:
    index = faiss.IndexFlatIP(dim)
    if hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    return index


def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    num_classes: int | None = None,
    k: int = 20,
    temperature: float = 0.07,
) -> torch.Tensor:
    """Class predictions ``[queries]`` for ``query_features [queries, dim]``."""
    num_classes = num_classes or int(train_labels.max()) + 1
    bank = torch.nn.functional.normalize(train_features.float(), dim=1).cpu().numpy().astype(np.float32)
    queries = torch.nn.functional.normalize(query_features.float(), dim=1).cpu().numpy().astype(np.float32)
    index = _index(bank.shape[1])
    index.add(bank)
    k = min(k, len(bank))
    similarity, neighbours = index.search(queries, k)
    weights = torch.from_numpy(similarity).div(temperature).exp()  # [queries, k]
    votes = torch.zeros(len(queries), num_classes)
    votes.scatter_add_(1, train_labels.cpu()[torch.from_numpy(neighbours)], weights)
    return votes.argmax(dim=1)


def knn_accuracy(train_features, train_labels, query_features, query_labels, k: int = 20, temperature: float = 0.07) -> float:
    """Top-1 accuracy of :func:`knn_predict`."""
    num_classes = int(max(train_labels.max(), query_labels.max())) + 1
    predicted = knn_predict(train_features, train_labels, query_features, num_classes, k, temperature)
    return float((predicted == query_labels.cpu()).float().mean())
