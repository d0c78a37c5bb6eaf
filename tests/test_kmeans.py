"""Balanced k-means: equal clusters covering every point once, better than a random balanced split."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssroute.errors import ConfigError
from ssroute.kmeans import balanced_kmeans, groups_of


@settings(max_examples=15, deadline=None)
@given(k=st.integers(1, 6), size=st.integers(1, 8), d=st.integers(1, 5), seed=st.integers(0, 3))
def test_equal_sizes_covering_every_point_once(k: int, size: int, d: int, seed: int) -> None:
    points = torch.randn(k * size, d, generator=torch.Generator().manual_seed(seed))
    assign, centroids = balanced_kmeans(points, k, seed=seed)
    assert torch.bincount(assign, minlength=k).tolist() == [size] * k
    groups = groups_of(assign, k)
    assert groups.shape == (k, size)
    assert sorted(groups.reshape(-1).tolist()) == list(range(k * size))
    assert centroids.shape == (k, d)


def test_finds_well_separated_clusters_and_beats_a_random_split() -> None:
    generator = torch.Generator().manual_seed(0)
    centres = 10 * torch.randn(4, 6, generator=generator)
    points = (centres.repeat_interleave(8, 0) + torch.randn(32, 6, generator=generator))[torch.randperm(32, generator=generator)]
    assign, centroids = balanced_kmeans(points, 4)
    cost = (points - centroids[assign]).square().sum()
    random = torch.randperm(32, generator=generator) % 4
    random_cost = sum((points[random == c] - points[random == c].mean(0)).square().sum() for c in range(4))
    assert cost < 0.2 * random_cost
    # every true cluster lands in one k-means cluster
    truth = torch.cdist(points, centres).argmin(-1)
    assert all(assign[truth == c].unique().numel() == 1 for c in range(4))


def test_k_must_divide_the_points() -> None:
    with pytest.raises(ConfigError, match="num_experts=3 does not divide the 8 points"):
        balanced_kmeans(torch.randn(8, 2), 3)
