"""Super-class clustering (Mobile V-MoE) and its targets in training."""

from __future__ import annotations

import itertools

import pytest
import torch

from ssroute.errors import ConfigError
from ssroute.objectives.superclass import align_clusters, class_superclasses, cluster_permutation, image_clusters, kmeans


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


def test_superclass_targets_add_a_cross_entropy_and_train_the_router() -> None:
    from ssroute.objectives.superclass import superclass_loss
    from ssroute.routing.image import ImageRouter

    images, tokens, dim, experts = 6, 9, 16, 4
    torch.manual_seed(0)
    router = ImageRouter(dim=dim, num_experts=experts, noise_std=0.0, importance_weight=0.0, load_weight=0.0)
    x = torch.randn(images * tokens, dim)
    targets = torch.arange(images) % experts
    assert float(router(x, tokens).aux_loss) == 0.0  # the router's own loss never includes it
    optimizer = torch.optim.SGD(router.parameters(), lr=1.0)
    logits = router.gate(x.view(images, tokens, dim).mean(1))
    first, accuracy = superclass_loss({1: router(x, tokens)}, targets, weight=1.0)
    assert float(first["superclass"]) == pytest.approx(float(torch.nn.functional.cross_entropy(logits, targets)), rel=1e-5)
    for _ in range(200):
        optimizer.zero_grad()
        superclass_loss({1: router(x, tokens)}, targets, weight=1.0)[0]["superclass"].backward()
        optimizer.step()
    loss, accuracy = superclass_loss({1: router(x, tokens)}, targets, weight=1.0)
    assert float(loss["superclass"]) < 0.1 * float(first["superclass"]) and float(accuracy["superclass_top1"]) == 1.0
    assert superclass_loss({}, targets, 1.0) == ({}, {})  # no image router: nothing to train
    with pytest.raises(ValueError, match="routed 6"):
        superclass_loss({1: router(x, tokens)}, torch.zeros(images + 1, dtype=torch.long), 1.0)
