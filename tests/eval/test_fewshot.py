"""Few-shot nearest class mean: hand-computed cases and the invariants of the draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ssroute.eval.fewshot import draw_support, fewshot_accuracy, prototype_accuracy


def test_prototype_accuracy_hand_computed():
    # prototypes along x (class 0) and y (class 1); queries 0 and 2 sit nearer the other class's axis
    support, labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])
    query = torch.tensor([[1.0, 0.5], [0.4, 1.0], [1.0, 1.2], [2.0, 1.0]])
    assert prototype_accuracy(support, labels, query, torch.tensor([1, 1, 0, 0]), centre=torch.zeros(2)) == 0.5


def test_centring_decides_the_prototype_direction():
    # un-centred, both prototypes point into the first quadrant and the query [3, 1.5] is nearer class 1's [1, 2]... or not:
    # centred by [1, 1] they become the axes, and the query (centred [2, 0.5]) is clearly class 0
    support, labels = torch.tensor([[2.0, 1.0], [1.0, 2.0]]), torch.tensor([0, 1])
    query = torch.tensor([[3.0, 1.5], [1.2, 4.0]])
    assert prototype_accuracy(support, labels, query, torch.tensor([0, 1]), centre=torch.ones(2)) == 1.0
    assert prototype_accuracy(support, labels, query, torch.tensor([1, 0]), centre=torch.ones(2)) == 0.0


def separable(per_class: int = 20, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(per_class)
    features = torch.eye(classes)[labels] * 5 + 0.1 * torch.randn(len(labels), classes, generator=g)
    return features, labels


def test_separable_features_are_classified_perfectly_from_one_shot():
    train, train_labels = separable(seed=0)
    test, test_labels = separable(per_class=7, seed=1)
    metrics = fewshot_accuracy(train, train_labels, test, test_labels, shots=[1, 5], draws=4)
    assert metrics == {"fewshot/1shot_top1": 1.0, "fewshot/1shot_top1_std": 0.0, "fewshot/5shot_top1": 1.0, "fewshot/5shot_top1_std": 0.0}


def test_shots_beyond_the_pool_use_every_image_so_draws_agree():
    g = torch.Generator().manual_seed(3)
    train, train_labels = torch.randn(12, 4, generator=g), torch.tensor([0, 1, 2] * 4)
    test, test_labels = torch.randn(30, 4, generator=g), torch.randint(0, 3, (30,), generator=g)
    whole = prototype_accuracy(train, train_labels, test, test_labels, centre=train.mean(dim=0))
    metrics = fewshot_accuracy(train, train_labels, test, test_labels, shots=[4, 50], draws=3)
    assert metrics["fewshot/4shot_top1"] == pytest.approx(whole) and metrics["fewshot/4shot_top1_std"] == 0.0
    assert metrics["fewshot/50shot_top1"] == pytest.approx(whole)


def test_draws_differ_and_are_reproducible_and_independent_of_other_shot_counts():
    g = torch.Generator().manual_seed(5)
    train, train_labels = torch.randn(200, 8, generator=g), torch.arange(4).repeat(50)
    test, test_labels = torch.randn(100, 8, generator=g), torch.arange(4).repeat(25)
    alone = fewshot_accuracy(train, train_labels, test, test_labels, shots=[1], draws=6, seed=2)
    together = fewshot_accuracy(train, train_labels, test, test_labels, shots=[5, 1], draws=6, seed=2)
    assert alone["fewshot/1shot_top1"] == together["fewshot/1shot_top1"]
    assert alone["fewshot/1shot_top1_std"] > 0  # random features: different supports, different accuracies


def test_draw_support_takes_n_per_class():
    labels = np.array([0, 0, 0, 1, 1, 2])
    pick = draw_support(labels, 2, np.random.default_rng(0))
    assert np.bincount(labels[pick]).tolist() == [2, 2, 1] and len(set(pick.tolist())) == 5
