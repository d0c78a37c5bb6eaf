"""VQ codebook router: look-up routing, EMA/gradient codebooks, k-means init, restarts."""

from __future__ import annotations

import pytest
import torch

from ssroute.errors import ConfigError
from ssroute.routing import build_router


def _clusters(per: int = 50, dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centres = 6 * torch.eye(4, dim)
    labels = torch.arange(4).repeat_interleave(per)
    return centres[labels] + 0.3 * torch.randn(4 * per, dim, generator=generator), labels


def test_routes_to_nearest_code_and_probs_are_softmax_of_distances() -> None:
    router = build_router("vq", dim=8, num_experts=4, temperature=0.5).eval()
    x = torch.randn(20, 8)
    routing = router(x)
    dist = torch.cdist(x, router.codebook).square() / 8
    assert torch.equal(routing.expert, dist.argmin(-1))
    assert torch.allclose(routing.probs, torch.softmax(-dist / 0.5, -1), atol=1e-5)


def test_kmeans_init_separates_clusters() -> None:
    x, labels = _clusters()
    router = build_router("vq", dim=8, num_experts=4).eval()
    router.init_codebook(x)
    expert = router(x).expert
    for c in range(4):
        assert expert[labels == c].unique().numel() == 1
    assert expert.unique().numel() == 4


def test_lazy_kmeans_init_on_first_training_batch() -> None:
    x, labels = _clusters()
    router = build_router("vq", dim=8, num_experts=4, kmeans_init=True)
    assert not bool(router.initialized)
    router(x)
    assert bool(router.initialized)
    assert router.eval()(x).expert.unique().numel() == 4


def test_ema_moves_codes_to_token_means_only_in_training() -> None:
    x, _ = _clusters()
    router = build_router("vq", dim=8, num_experts=4, decay=0.5)
    router.init_codebook(x + 1.0)  # offset codes; EMA should pull them back onto the clusters
    before = router.codebook.clone()
    router.eval()(x)
    assert torch.equal(router.codebook, before)
    router.train()
    for _ in range(10):
        router(x)
    centres = torch.stack([x[router.eval()(x).expert == c].mean(0) for c in range(4)])
    assert (router.codebook - centres).abs().max() < 0.05 < (before - centres).abs().max()


@pytest.mark.parametrize("update", ["ema", "gradient"])
def test_dead_codes_restart_at_batch_tokens(update: str) -> None:
    x, _ = _clusters()
    router = build_router("vq", dim=8, num_experts=4, update=update)
    router.init_codebook(x)
    with torch.no_grad():
        router.codebook[3] = 100.0  # far away: never used
        router.recent_usage[3] = 0.0
    routing = router(x)
    assert bool((routing.expert == 3).any())  # restarted onto a token of this batch, so it is used at once
    assert float(router.recent_usage[3]) > router.restart_threshold / 4
    if update == "gradient":  # no EMA averaging: the code is exactly that token
        assert (router.codebook[3] - x).norm(dim=-1).min() < 1e-5


@pytest.mark.parametrize("tokens_per_batch", [200, 4096])
def test_a_code_that_stops_getting_tokens_restarts_within_a_few_dozen_steps(tokens_per_batch: int) -> None:
    # the threshold is a share of the fair 1/codes share, so batch size does not change when a code counts as dead
    x, labels = _clusters(per=tokens_per_batch // 4)
    router = build_router("vq", dim=8, num_experts=4)
    router.init_codebook(x)
    code = int(router.eval()(x[labels == 3]).expert[0])  # the code of cluster 3, used so far
    router.train()
    before = router.codebook[code].clone()
    moved = []
    for _ in range(40):  # batches without cluster 3: the code gets no tokens
        router(x[labels != 3])
        moved.append(float((router.codebook[code] - before).norm()) > 1.0)  # restarted onto a token of another cluster
    assert any(moved) and moved.index(True) < 30


def test_gradient_codebook_learns_from_the_codebook_loss() -> None:
    router = build_router("vq", dim=8, num_experts=4, update="gradient")
    routing = router(torch.randn(32, 8))
    routing.aux_loss.backward()
    assert router.codebook.grad is not None and bool(router.codebook.grad.abs().sum() > 0)


def test_projection_and_dimension_checks() -> None:
    with pytest.raises(ConfigError, match="codebook_dim=4 does not match dim=8"):
        build_router("vq", dim=8, num_experts=4, codebook_dim=4)
    router = build_router("vq", dim=8, num_experts=4, codebook_dim=4, project=True)
    assert router(torch.randn(10, 8)).probs.shape == (10, 4)
    with pytest.raises(ConfigError, match="init data"):
        router.init_codebook(torch.randn(100, 5))
    with pytest.raises(ConfigError, match="codebook shape"):
        router.set_codebook(torch.randn(4, 8))
    with pytest.raises(ConfigError, match="update='adam'"):
        build_router("vq", dim=8, num_experts=4, update="adam")


def test_codes_per_expert_map_to_their_expert() -> None:
    router = build_router("vq", dim=8, num_experts=2, codes_per_expert=3).eval()
    x = router.codebook[[0, 2, 3, 5]] + 1e-3
    assert router(x).expert.tolist() == [0, 0, 1, 1]
