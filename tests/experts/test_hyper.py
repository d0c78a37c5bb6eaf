"""Hypernetwork experts: weights come from embeddings, new experts on the fly, fewer parameters than mlp."""

from __future__ import annotations

import pytest
import torch

from ssroute.errors import ConfigError
from ssroute.experts import build_experts
from ssroute.moe import build_moe


@pytest.mark.parametrize("rank", [None, 4])
def test_generated_weights_change_with_the_embedding(rank) -> None:
    torch.manual_seed(0)
    bank = build_experts("hyper", dim=8, hidden=16, num_experts=3, embed_dim=4, rank=rank)
    before = [t.detach().clone() for t in bank.generate(bank.embeddings)]
    with torch.no_grad():
        bank.embeddings[1] += 0.5
    after = bank.generate(bank.embeddings)
    for old, new in zip(before, after, strict=True):
        assert torch.equal(old[[0, 2]], new[[0, 2]]) and not torch.allclose(old[1], new[1])
    assert after[0].shape == (3, 8, 16) and after[2].shape == (3, 16, 8)


def test_rows_run_through_the_generated_mlp() -> None:
    torch.manual_seed(0)
    bank = build_experts("hyper", dim=8, hidden=16, num_experts=2, embed_dim=4, rank=None)
    x = torch.randn(5, 8)
    w_in, b_in, w_out, b_out = bank.generate(bank.embeddings)
    expected = bank.act(x[2:] @ w_in[1] + b_in[1]) @ w_out[1] + b_out[1]
    assert torch.allclose(bank(x, [2, 3], None)[2:], expected, atol=1e-5)


def test_gradients_reach_the_hypernetwork_and_the_embeddings() -> None:
    moe = build_moe(dim=8, hidden=16, num_experts=4, router="hash", experts="hyper", embed_dim=4)
    moe(torch.randn(2, 6, 8)).square().sum().backward()
    grads = {name: p.grad for name, p in moe.experts.named_parameters()}
    assert set(grads) >= {"embeddings", "gen_in.left", "gen_in.right", "gen_out.left", "gen_b_in.weight"}
    assert all(g is not None and bool((g != 0).any()) for g in grads.values())


def test_an_interpolated_expert_runs_in_the_layer() -> None:
    torch.manual_seed(0)
    moe = build_moe(dim=8, hidden=16, num_experts=4, router="hash", experts="hyper", embed_dim=4).eval()
    x = torch.randn(2, 8, 8)
    base = moe(x)
    bank = moe.experts
    new = torch.lerp(bank.embeddings[0], bank.embeddings[1], 0.5)
    swapped = bank.embeddings.detach().clone()
    swapped[3] = new
    with bank.use_embeddings(swapped):
        out, routing = moe.forward_with_routing(x)
    on_expert3 = (routing.expert == 3).nonzero().squeeze(1)  # hash routing: token i -> pair i
    rest = torch.ones(16, dtype=torch.bool)
    rest[on_expert3] = False
    flat, flat_base = out.view(16, 8), base.view(16, 8)
    assert torch.equal(flat[rest], flat_base[rest]) and not torch.allclose(flat[on_expert3], flat_base[on_expert3])
    direct = bank.forward_with(x.view(16, 8)[on_expert3], [len(on_expert3)], None, new[None])
    assert torch.allclose(flat[on_expert3], direct, atol=1e-6)
    assert bank.forward_with(x.view(16, 8), [16], None, bank.summary_embedding(x.view(16, 8))).shape == (16, 8)
    assert torch.allclose(moe(x), base)  # the override ends with the block


def _measured_flops_per_row(bank, dim: int, experts: int) -> float:
    """FLOPs one more row per expert costs, counted by FlopCounterMode (per-forward costs such as generation cancel)."""
    from torch.utils.flop_counter import FlopCounterMode

    totals = []
    for rows in (4, 12):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            bank(torch.randn(rows * experts, dim), [rows] * experts, None)
        totals.append(counter.get_total_flops())
    return (totals[1] - totals[0]) / (8 * experts)


def test_fewer_parameters_than_mlp_at_equal_flops() -> None:
    dim, hidden, experts = 64, 128, 8
    hyper = build_experts("hyper", dim=dim, hidden=hidden, num_experts=experts, embed_dim=16, rank=8)
    mlp = build_experts("mlp", dim=dim, hidden=hidden, num_experts=experts)
    measured = _measured_flops_per_row(hyper, dim, experts)
    assert measured == _measured_flops_per_row(mlp, dim, experts) == hyper.flops_per_row(49) == mlp.flops_per_row(49)
    params = lambda bank: sum(p.numel() for p in bank.parameters())  # noqa: E731
    assert params(hyper) < params(mlp) / 2
    assert hyper.params_per_expert() == 16 and hyper.shared_params() == params(hyper) - experts * 16


def test_bad_options() -> None:
    with pytest.raises(ConfigError, match="rank=99"):
        build_experts("hyper", dim=8, hidden=16, num_experts=2, rank=99)
    bank = build_experts("hyper", dim=8, hidden=16, num_experts=2, embed_dim=4)
    with pytest.raises(ConfigError, match="2 row blocks but 1 embeddings"):
        bank.forward_with(torch.randn(3, 8), [1, 2], None, bank.embeddings[:1])


def test_the_expert_built_for_a_cluster_has_the_highest_affinity_and_dominates_its_summary() -> None:
    torch.manual_seed(0)
    bank = build_experts("hyper", dim=8, hidden=16, num_experts=4, embed_dim=4, rank=None)
    with torch.no_grad():  # expert i (embedding e_i) gets w_in = u_i x 1: every hidden unit detects direction u_i = e_i
        bank.embeddings.copy_(torch.eye(4))
        bank.gen_in.full.copy_(torch.eye(4, 8).repeat_interleave(16, dim=1))
        bank.gen_b_in.weight.zero_()
        bank.gen_b_in.bias.zero_()
    for target in range(4):
        # a cluster at +-3 u_target: the expert fires on half of it, and its signed responses over the cluster cancel
        sign = torch.tensor([1.0, -1.0]).repeat(16)[:, None]
        cluster = sign * 3.0 * torch.eye(8)[target] + 0.05 * torch.randn(32, 8)
        affinity = bank.affinity(cluster).detach()
        assert int(affinity.argmax()) == target and float(affinity[target]) > 5 * float(affinity.sort().values[-2])
        summary = bank.summary_embedding(cluster)[0]
        assert int((bank.embeddings - summary).norm(dim=1).argmin()) == target
