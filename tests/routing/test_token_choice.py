"""Softmax and sinkhorn token choice: top-k, capacity, batch priority routing, losses."""

from __future__ import annotations

import pytest
import torch

from ssroute.errors import ConfigError
from ssroute.routing import build_router
from ssroute.routing.losses import importance_loss, noisy_load_loss, switch_load_loss, z_loss


def _confident_router(batch_priority: bool):
    router = build_router("token_choice", dim=4, num_experts=2, k=1, capacity_factor=0.5, batch_priority=batch_priority, noise_std=0.0)
    with torch.no_grad():
        router.gate.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0]]))
    return router


@pytest.mark.parametrize("batch_priority", [False, True])
def test_batch_priority_keeps_most_confident_tokens(batch_priority: bool) -> None:
    # every token prefers expert 0, with confidence growing with x[:, 0]; capacity 2 of 8 binds
    confidence = torch.tensor([0.1, 0.9, 0.3, 2.0, 0.2, 1.5, 0.4, 0.5])
    tokens = torch.zeros(8, 4)
    tokens[:, 0] = confidence
    routing = _confident_router(batch_priority).eval()(tokens, tokens_per_group=8)
    assert routing.capacity == 2 and set(routing.expert.tolist()) == {0}
    expected = {3, 5} if batch_priority else {0, 1}  # BPR: highest top-1 gate; otherwise first come first served
    assert set(routing.token.tolist()) == expected
    assert int(routing.num_dropped) == 6


def test_bpr_is_per_group() -> None:
    tokens = torch.zeros(8, 4)
    tokens[:, 0] = torch.tensor([0.1, 0.2, 0.3, 3.0, 2.0, 1.0, 0.5, 0.4])
    routing = _confident_router(True).eval()(tokens, tokens_per_group=4)  # capacity 1 per group
    assert sorted(routing.token.tolist()) == [3, 4]


def test_second_choices_queue_behind_first_choices() -> None:
    router = build_router("token_choice", dim=4, num_experts=2, k=2, capacity_factor=0.5, noise_std=0.0).eval()
    with torch.no_grad():
        router.gate.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0]]))
    tokens = torch.zeros(4, 4)
    tokens[:, 0] = torch.tensor([1.0, -1.0, 1.0, -1.0])  # tokens 0, 2 prefer expert 0; 1, 3 expert 1
    routing = router(tokens, tokens_per_group=4)  # capacity = ceil(0.5 * 2 * 4 / 2) = 2
    pairs = sorted(zip(routing.token.tolist(), routing.expert.tolist(), strict=True))
    assert pairs == [(0, 0), (1, 1), (2, 0), (3, 1)]  # only first choices fit


def test_top_k_without_capacity_keeps_k_per_token() -> None:
    router = build_router("token_choice", dim=8, num_experts=6, k=3, capacity_factor=None, noise_std=0.0)
    routing = router(torch.randn(20, 8))
    assert routing.experts_per_token().tolist() == [3] * 20
    top = torch.topk(routing.probs, 3, dim=-1).indices
    for t in range(20):
        assert set(routing.expert[routing.token == t].tolist()) == set(top[t].tolist())
    router.set_k(1)
    assert router(torch.randn(20, 8)).token.numel() == 20


def test_noise_only_in_training_and_only_in_the_choice() -> None:
    router = build_router("token_choice", dim=8, num_experts=4, noise_std=1.0, capacity_factor=None)
    x = torch.randn(32, 8)
    router.eval()
    a, b = router(x), router(x)
    assert torch.equal(a.expert, b.expert) and torch.equal(a.weight, b.weight)
    assert torch.equal(a.expert, a.probs.argmax(-1))
    router.train()
    a, b = router(x), router(x)
    assert not (torch.equal(a.expert, b.expert) and torch.equal(a.weight, b.weight))  # noisy choice and combine weights
    assert torch.equal(a.probs, b.probs) and torch.allclose(a.probs, torch.softmax(router.gate(x), -1), atol=1e-6)  # V-MoE: clean distribution


def test_batch_priority_uses_the_raw_gate_when_weights_are_normalised() -> None:
    # k=2 with normalisation: the normalised first gate is p1 / (p1 + p2), which ranks tokens differently from p1 itself
    router = build_router("token_choice", dim=3, num_experts=3, k=2, capacity_factor=1 / 3, batch_priority=True,
                          normalize_weights=True, noise_std=0.0).eval()  # fmt: skip
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(3))
    # tokens 0 and 1 both put expert 0 first: raw gates 0.6 vs 0.55, normalised top-2 gates 0.61 vs 0.69
    probs = torch.tensor([[0.6, 0.39, 0.01], [0.55, 0.25, 0.2], [0.15, 0.25, 0.6]])
    routing = router(probs.log(), tokens_per_group=3)  # capacity 1 per expert
    assert routing.token[routing.expert == 0].tolist() == [0]  # the larger raw gate wins, as in V-MoE
    raw = build_router("token_choice", dim=3, num_experts=3, k=2, capacity_factor=1 / 3, batch_priority=True, noise_std=0.0).eval()
    raw.gate.load_state_dict(router.gate.state_dict())
    unnormalised = raw(probs.log(), tokens_per_group=3)
    assert unnormalised.token[unnormalised.expert == 0].tolist() == [0]


def test_k1_with_normalised_weights_is_refused() -> None:
    with pytest.raises(ConfigError, match="no gradient"):
        build_router("token_choice", dim=4, num_experts=4, k=1, normalize_weights=True)
    router = build_router("token_choice", dim=4, num_experts=4, k=2, normalize_weights=True)
    with pytest.raises(ConfigError, match="no gradient"):
        router.set_k(1)


def test_balance_losses_are_per_group() -> None:
    # two images, each routing all its tokens to one expert, but to different ones: the batch is balanced, each image is not
    probs = torch.tensor([[1.0, 0.0]] * 4 + [[0.0, 1.0]] * 4)
    assert float(importance_loss(probs)) == pytest.approx(0.0, abs=1e-6)
    assert float(importance_loss(probs, group_tokens=4)) == pytest.approx(1.0, abs=1e-6)
    top1 = probs.argmax(-1)
    assert float(switch_load_loss(probs, top1)) == pytest.approx(1.0, abs=1e-6)
    assert float(switch_load_loss(probs, top1, group_tokens=4)) == pytest.approx(2.0, abs=1e-6)


def test_sinkhorn_token_choice_is_more_balanced_than_softmax() -> None:
    torch.manual_seed(0)
    x = torch.randn(256, 8) + 2.0  # shared offset: softmax routing collapses onto few experts
    soft = build_router("token_choice", dim=8, num_experts=4, capacity_factor=None, noise_std=0.0)
    sink = build_router("sinkhorn_token_choice", dim=8, num_experts=4, capacity_factor=None, sinkhorn_iters=50)
    sink.gate.load_state_dict(soft.gate.state_dict())
    spread = lambda r: r(x).load().float().std().item()
    assert spread(sink) < spread(soft)
    assert torch.allclose(soft(x).probs, sink(x).probs)  # same combine distribution


def test_losses() -> None:
    uniform = torch.full((10, 4), 0.25)
    assert float(importance_loss(uniform)) == pytest.approx(0.0, abs=1e-7)
    skewed = torch.tensor([[0.97, 0.01, 0.01, 0.01]]).repeat(10, 1)
    assert float(importance_loss(skewed)) > 1.0
    assert float(switch_load_loss(uniform, torch.arange(10) % 4)) == pytest.approx(1.0, rel=1e-5)
    assert float(z_loss(torch.zeros(3, 4))) == pytest.approx(torch.log(torch.tensor(4.0)).item() ** 2)
    logits = torch.randn(50, 4, requires_grad=True)
    noisy_load_loss(logits, logits.detach() + 0.3 * torch.randn(50, 4), 0.3, 1).backward()
    assert logits.grad is not None and bool(logits.grad.abs().sum() > 0)


def test_cosine_gate_ignores_the_token_norm_and_bounds_the_logits():
    from ssroute.routing import build_router

    torch.manual_seed(0)
    router = build_router("token_choice", dim=8, num_experts=4, cosine_scale=5.0, noise_std=0.0, capacity_factor=None)
    tokens = torch.randn(10, 8)
    assert torch.allclose(router(tokens).probs, router(3.0 * tokens).probs, atol=1e-6)
    assert float(router.gate(tokens).abs().max()) <= 5.0 + 1e-5
    plain = build_router("token_choice", dim=8, num_experts=4, noise_std=0.0, capacity_factor=None)
    assert not torch.allclose(plain(tokens).probs, plain(3.0 * tokens).probs, atol=1e-3)


def test_cosine_scale_must_be_positive():
    from ssroute.errors import ConfigError
    from ssroute.routing import build_router

    with pytest.raises(ConfigError, match="cosine_scale=0"):
        build_router("token_choice", dim=8, num_experts=4, cosine_scale=0.0)
