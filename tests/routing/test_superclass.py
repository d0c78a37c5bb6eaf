"""Super-class clustering (Mobile V-MoE) and its targets in training."""

from __future__ import annotations

import itertools

import pytest
import torch

from ssroute.errors import ConfigError
from ssroute.layers.moe import build_moe
from ssroute.routing.superclass import align_clusters, class_superclasses, cluster_permutation, image_clusters, kmeans
from ssroute.train.superclass import check_superclass, pooled_features, superclass_targets


def planted(groups: int, per_group: int, dim: int = 8, spread: float = 0.3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``groups * per_group`` points around ``groups`` far-apart centres; returns (points, true group)."""
    g = torch.Generator().manual_seed(seed)
    centres = 10 * torch.randn(groups, dim, generator=g)
    truth = torch.arange(groups).repeat_interleave(per_group)
    return centres[truth] + spread * torch.randn(len(truth), dim, generator=g), truth


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to a relabelling: i and j together in a exactly when together in b."""
    return torch.equal(a[:, None] == a[None, :], b[:, None] == b[None, :])


@pytest.mark.parametrize("seed", range(5))
def test_class_means_in_planted_groups_give_the_groups_exactly(seed: int) -> None:
    means, truth = planted(groups=3, per_group=4, seed=seed)  # 12 classes in 3 well-separated groups
    classes = torch.randperm(12, generator=torch.Generator().manual_seed(seed))
    # 5 images per class, in shuffled order, scattered around the class mean: the clustering sees their average
    labels = classes.repeat_interleave(5)
    images = means[labels] + 0.1 * torch.randn(60, 8, generator=torch.Generator().manual_seed(seed + 1))
    groups = class_superclasses(images, labels, num_classes=12, num_superclasses=3, seed=seed)
    assert groups.shape == (12,) and groups.dtype == torch.long
    assert same_partition(groups, truth)  # class c's mean is means[c], in group truth[c]


def test_image_clusters_recover_planted_groups_and_kmeans_returns_centroids() -> None:
    points, truth = planted(groups=4, per_group=50, dim=6)
    assert same_partition(image_clusters(points, 4), truth)
    assign, centroids = kmeans(points, 4)
    for c in range(4):
        assert torch.allclose(centroids[c], points[assign == c].mean(0), atol=1e-3)


def test_too_many_superclasses_or_a_missing_class_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="3 points into 4 clusters"):
        kmeans(torch.randn(3, 2), 4)
    with pytest.raises(ConfigError, match=r"classes \[2\] have no image"):
        class_superclasses(torch.randn(4, 2), torch.tensor([0, 1, 0, 3]), num_classes=4, num_superclasses=2)


def test_alignment_is_the_best_permutation_by_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    assign, reference = torch.randint(0, 4, (40,), generator=g), torch.randint(0, 4, (40,), generator=g)
    best = max(itertools.permutations(range(4)), key=lambda p: int((torch.tensor(p)[assign] == reference).sum()))
    aligned = align_clusters(assign, reference, 4)
    assert int((aligned == reference).sum()) == int((torch.tensor(best)[assign] == reference).sum())
    assert same_partition(aligned, assign)
    assert sorted(cluster_permutation(assign, reference, 4).tolist()) == [0, 1, 2, 3]


def test_targets_reach_every_image_router_and_are_cleared() -> None:
    model = torch.nn.ModuleDict(
        {"a": build_moe(dim=8, hidden=8, num_experts=2, router="image"), "b": build_moe(dim=8, hidden=8, num_experts=2)}
    )
    cfg = type("C", (), {"superclass": type("S", (), {"weight": 1.0})})()
    layers = check_superclass(cfg, model)
    assert list(layers) == ["a"]
    targets = torch.tensor([0, 1, 1])
    with superclass_targets(layers, targets, weight=0.5):
        out = model["a"](torch.randn(3, 5, 8))
        assert model["a"].router.superclass_targets is targets
    assert model["a"].router.superclass_targets is None and out.shape == (3, 5, 8)
    assert float(model["a"].aux_loss) > 0 and model["a"].router.last_superclass_loss is not None
    with pytest.raises(ConfigError, match="needs an image-routed MoE layer; set router=image"):
        check_superclass(cfg, torch.nn.ModuleDict({"b": model["b"]}))


def test_pooled_features_capture_what_the_router_pools() -> None:
    torch.manual_seed(0)
    layer = build_moe(dim=8, hidden=8, num_experts=3, router="image")
    backbone = torch.nn.Sequential(torch.nn.Linear(4, 8), layer)
    backbone.pool = None  # a plain module works: features come from the layer's input
    images = torch.randn(10, 5, 4)
    loader = [
        (images[:6], torch.zeros(6, dtype=torch.long), torch.arange(6)),
        (images[6:], torch.ones(4, dtype=torch.long), torch.arange(6, 10)),
    ]
    found = pooled_features(backbone, loader, lambda x: x, torch.device("cpu"), layer)
    expected = backbone[0](images).mean(dim=1)
    assert torch.allclose(found["features"], expected, atol=1e-6)
    logits = expected @ layer.router.gate.weight.t()
    assert torch.equal(found["router_top1"], logits.argmax(-1)) and torch.equal(found["index"], torch.arange(10))
    assert backbone.training  # restored after the eval-mode pass
