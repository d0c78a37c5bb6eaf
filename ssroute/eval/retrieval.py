"""Retrieval metrics on frozen features with pytorch-metric-learning's ``AccuracyCalculator``.

Test images are the queries, training images the reference set (they do not
overlap, so no query retrieves itself). Features are L2-normalised first, so the
L2 neighbours faiss returns (pml's ``FaissKNN``, on the GPU when faiss sees one)
are the cosine neighbours. Precision@1 is the share of queries whose nearest
reference has their class; MAP@R (Musgrave et al. 2020, "A Metric Learning
Reality Check", arXiv 2003.08505) ranks the ``R`` nearest references, ``R`` =
the number of references of the query's class, and averages the precision at
each relevant position — it rewards whole classes forming tight clusters,
which precision@1 does not see.

``query [queries, dim]``, ``reference [references, dim]``.

>>> import torch
>>> reference = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
>>> labels = torch.tensor([0, 0, 1, 1])
>>> retrieval_metrics(torch.tensor([[1.0, 0.05], [0.05, 1.0]]), torch.tensor([0, 1]), reference, labels)
{'retrieval/precision_at_1': 1.0, 'retrieval/map_at_r': 1.0}
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

logging.getLogger("faiss.loader").setLevel(logging.WARNING)
logging.getLogger("PML").setLevel(logging.WARNING)  # pml logs every k-NN search at INFO

METRICS = {"precision_at_1": "precision_at_1", "mean_average_precision_at_r": "map_at_r"}  # pml name -> our key


def retrieval_metrics(
    query: torch.Tensor, query_labels: torch.Tensor, reference: torch.Tensor, reference_labels: torch.Tensor
) -> dict[str, float]:
    """``retrieval/precision_at_1`` and ``retrieval/map_at_r`` of ``query`` against ``reference``."""
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import FaissKNN

    # max_bin_count: as many neighbours as the largest class has references (R), all MAP@R needs
    calculator = AccuracyCalculator(include=tuple(METRICS), k="max_bin_count", knn_func=FaissKNN(), device=torch.device("cpu"))
    scores = calculator.get_accuracy(
        F.normalize(query.float().cpu(), dim=1),
        query_labels.cpu(),
        F.normalize(reference.float().cpu(), dim=1),
        reference_labels.cpu(),
        ref_includes_query=False,
    )
    return {f"retrieval/{short}": float(scores[name]) for name, short in METRICS.items()}
