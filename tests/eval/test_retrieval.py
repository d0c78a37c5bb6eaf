"""pytorch-metric-learning retrieval metrics on constructed cases with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from ssroute.eval.retrieval import retrieval_metrics


def at(degrees: list[float]) -> torch.Tensor:
    radians = torch.tensor(degrees) * math.pi / 180
    return torch.stack([radians.cos(), radians.sin()], dim=1)


def test_perfect_clusters_score_one():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 10
    reference_labels, query_labels = torch.arange(4).repeat(6), torch.arange(4).repeat(3)
    reference = centres[reference_labels] + 0.01 * torch.randn(24, 16, generator=g)
    query = centres[query_labels] + 0.01 * torch.randn(12, 16, generator=g)
    assert retrieval_metrics(query, query_labels, reference, reference_labels) == {
        "retrieval/precision_at_1": 1.0,
        "retrieval/map_at_r": 1.0,
    }


def test_known_ranking_gives_known_map_at_r():
    # references on the unit circle: class 0 at 0 and 20 degrees, class 1 at 10 and 90 (R = 2 for both queries)
    reference, reference_labels = at([0.0, 20.0, 10.0, 90.0]), torch.tensor([0, 0, 1, 1])
    # query of class 0 at 1 degree ranks 0 (hit), 10 (miss): AP@R = (1/2)(1/1) = 0.5
    # query of class 1 at 18 degrees ranks 20 (miss), 10 (hit at rank 2): AP@R = (1/2)(1/2) = 0.25
    metrics = retrieval_metrics(at([1.0, 18.0]), torch.tensor([0, 1]), reference, reference_labels)
    assert metrics["retrieval/precision_at_1"] == pytest.approx(0.5)
    assert metrics["retrieval/map_at_r"] == pytest.approx((0.5 + 0.25) / 2)


def test_scale_of_features_does_not_matter():
    # cosine retrieval: features are normalised first, so scaling a reference does not move it in the ranking
    reference, reference_labels = at([0.0, 20.0, 10.0, 90.0]), torch.tensor([0, 0, 1, 1])
    scaled = reference * torch.tensor([[1.0], [100.0], [0.01], [3.0]])
    query, labels = at([1.0, 18.0]), torch.tensor([0, 1])
    assert retrieval_metrics(query, labels, scaled, reference_labels) == retrieval_metrics(query, labels, reference, reference_labels)
