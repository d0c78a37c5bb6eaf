"""Routing over depth: identity is exact, ACT halts where hand-computed, grouped execution equals a per-image loop, stats count."""

import json
import math

import pytest
import torch

from ssroute.errors import ConfigError
from ssroute.models import build_backbone
from ssroute.models.depth_router import DepthRoutedStack, act_step
from ssroute.models.depth_stats import DepthStats
from ssroute.train.finetune import run_finetune
from ssroute.train.pretrain import run_pretrain


def make_stack(**options) -> DepthRoutedStack:
    torch.manual_seed(0)
    defaults = dict(dim=16, heads=2, pool_blocks=2, identity_blocks=2, max_steps=3)
    return DepthRoutedStack(**{**defaults, **options})


def summary(stack: DepthRoutedStack, *traces, order: bool = False) -> dict[str, float]:
    """The ``depth/*`` statistics of some forwards' traces (what training logs and the evaluation reports)."""
    stats = DepthStats(stack.max_steps, stack.num_choices, stack.num_blocks)
    for trace in traces:
        stats.add(trace.picks, trace.halted_at, trace.ponder)
    return stats.summary(stack.names, order=order)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("stop_on_identity", [False, True])
def test_forced_identity_returns_the_input_exactly(training, stop_on_identity):
    stack = make_stack(stop_on_identity=stop_on_identity).train(training)
    x = torch.randn(5, 7, 16, requires_grad=True)
    choices = torch.tensor([2, 3, 2]).expand(5, 3)  # identities only (P = 2)
    out, trace = stack(x, choices=choices)
    assert torch.equal(out, x)
    assert summary(stack, trace)["depth/blocks_per_image"] == 0.0


def test_forced_block_output_is_exactly_the_block_and_the_router_still_learns():
    stack = make_stack(max_steps=1).train()
    x = torch.randn(4, 6, 16)
    out, _ = stack(x, choices=torch.ones(4, 1, dtype=torch.long))
    assert torch.equal(out, stack.blocks[1](x)[0])  # the straight-through gate adds exactly zero
    out.square().sum().backward()
    assert stack.controller.router.weight.grad.abs().sum() > 0 and stack.controller.step_bias.grad[0, 1] != 0


def test_act_step_weights_and_remainder():
    h = torch.tensor([[0.3, 0.3, 0.5, 0.2], [0.995, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1]])
    total, weights, halted = torch.zeros(3), torch.zeros(3, 4), torch.zeros(3, dtype=torch.bool)
    for s in range(4):
        new_total, halts, w = act_step(total, h[:, s], 0.99, torch.full((3,), s == 3))
        weights[:, s] = torch.where(halted, 0.0, w)
        halted |= halts
        total = torch.where(halted & ~halts, total, new_total)
    expected = torch.tensor([[0.3, 0.3, 0.4, 0.0], [1.0, 0.0, 0.0, 0.0], [0.1, 0.1, 0.1, 0.7]])
    assert torch.allclose(weights, expected)


@pytest.mark.parametrize("epsilon, steps, remainder", [(0.05, 4, 0.1), (0.15, 3, 0.4), (0.5, 2, 0.7)])
def test_halting_stops_at_the_configured_threshold(epsilon, steps, remainder):
    # h = 0.3 at every step: cumulative 0.3, 0.6, 0.9, 1.2 against the threshold 1 - epsilon
    stack = make_stack(max_steps=6, halting=True, halt_epsilon=epsilon, ponder_weight=1.0).train()
    torch.nn.init.zeros_(stack.halt_head.weight)
    torch.nn.init.constant_(stack.halt_head.bias, math.log(0.3 / 0.7))
    x = torch.randn(3, 5, 16)
    out, trace = stack(x, choices=torch.zeros(3, 6, dtype=torch.long))  # block 0 at every step
    states, expected = x, torch.zeros_like(x)
    for s in range(steps):
        states = stack.blocks[0](states)[0]
        expected = expected + (0.3 if s < steps - 1 else remainder) * states
    assert torch.allclose(out, expected, atol=1e-5)
    stats = summary(stack, trace)
    assert stats["depth/steps_per_image"] == steps and stats["depth/blocks_per_image"] == steps
    assert stats["depth/ponder_cost"] == pytest.approx(steps + remainder, abs=1e-5)
    # ponder cost n + R reaches the halting unit through R = 1 - (n - 1) h: d/d bias = -(n - 1) h (1 - h) / max_steps
    (trace.ponder_loss + (out * 0).sum()).backward()
    assert stack.halt_head.bias.grad.item() == pytest.approx(-(steps - 1) * 0.21 / 6, rel=1e-4)


def test_halted_images_stop_being_computed():
    stack = make_stack(max_steps=4, halting=True).eval()
    script = iter([[0.3, 0.995, 0.3], [0.3, 0.3], [0.5, 0.3], [0.3]])  # halts: image 1 at step 1, image 0 at 3, image 2 at 4
    stack.halt_prob = lambda state: torch.tensor(next(script))
    sizes = []
    stack.blocks[0].register_forward_hook(lambda module, args, out: sizes.append(args[0].shape[0]))
    x = torch.randn(3, 5, 16)
    out, trace = stack(x, choices=torch.zeros(3, 4, dtype=torch.long))
    assert sizes == [3, 2, 2, 1]
    weights = [[0.3, 0.3, 0.4], [1.0], [0.3, 0.3, 0.3, 0.1]]
    for i, w in enumerate(weights):
        state, expected = x[i : i + 1], 0
        for a in w:
            state = stack.blocks[0](state)[0]
            expected = expected + a * state
        assert torch.allclose(out[i : i + 1], expected, atol=1e-5)
    assert summary(stack, trace)["depth/steps_per_image"] == pytest.approx(8 / 3)


@pytest.mark.parametrize("halting", [False, True])
def test_grouped_execution_matches_a_per_image_loop(halting):
    stack = make_stack(pool_blocks=3, identity_blocks=1, max_steps=4, order_prior=0.0, halting=halting, halt_epsilon=0.3).eval()
    torch.nn.init.normal_(stack.controller.router.weight, std=2.0)  # varied choices across images
    if halting:
        torch.nn.init.normal_(stack.halt_head.weight, std=1.0)
    calls = []
    for j, block in enumerate(stack.blocks):
        block.register_forward_hook(lambda module, args, out, j=j: calls.append(j))
    x = torch.randn(12, 5, 16)
    with torch.no_grad():
        out, trace = stack(x)
        grouped_calls = list(calls)
        reference = []
        for i in range(x.shape[0]):
            state, total, result = x[i : i + 1], 0.0, torch.zeros_like(x[i : i + 1])
            for s in range(4):
                choice = int(stack.route(stack.state(state), s).argmax())
                if choice < 3:
                    state = stack.blocks[choice](state)[0]
                if not halting:
                    continue
                h = float(stack.halt_prob(stack.state(state)))
                if total + h >= 0.7 or s == 3:
                    result = result + (1 - total) * state
                    break
                result, total = result + h * state, total + h
            reference.append(result if halting else state)
    assert torch.allclose(out, torch.cat(reference), atol=1e-5)
    assert torch.unique(trace.picks[:, 0]).numel() >= 2  # the images really took different blocks
    assert all(grouped_calls.count(j) <= 4 for j in range(3))  # each block at most once per step


def test_layer_order_matrix_counts_a_hand_made_choice_sequence():
    choices = torch.tensor([[0, 2, 1], [2, 2, 2], [1, 0, 3]])  # P = 2: choices 2 and 3 are identities
    stack = make_stack().eval()
    _, trace = stack(torch.randn(3, 4, 16), choices=choices)
    stats = DepthStats(stack.max_steps, stack.num_choices, stack.num_blocks)
    stats.add(trace.picks, trace.halted_at)
    assert stats.order.tolist() == [[1, 1, 1, 0], [1, 0, 2, 0], [0, 1, 1, 1]]
    metrics = summary(stack, trace, order=True)
    assert metrics["depth/identity_share"] == pytest.approx(5 / 9)
    assert metrics["depth/blocks_per_image"] == pytest.approx(4 / 3) and metrics["depth/compute_saved"] == pytest.approx(1 - 4 / 9)
    assert metrics["depth/order/s1/id0"] == pytest.approx(2 / 3) and metrics["depth/order/s2/id1"] == pytest.approx(1 / 3)
    stopping = make_stack(stop_on_identity=True).eval()
    _, trace = stopping(torch.randn(3, 4, 16), choices=choices)
    stats = DepthStats(stopping.max_steps, stopping.num_choices, stopping.num_blocks)
    stats.add(trace.picks, trace.halted_at)
    assert stats.order.tolist() == [[1, 1, 1, 0], [1, 0, 1, 0], [0, 0, 0, 1]]
    assert summary(stopping, trace)["depth/steps_per_image"] == pytest.approx(2.0)


def test_each_forward_returns_its_own_trace_and_leaves_no_statistics_behind():
    stack = make_stack()
    state = {k: v.clone() for k, v in stack.state_dict().items()}
    attributes = set(vars(stack))
    _, first = stack.eval()(torch.randn(2, 4, 16))
    _, second = stack.train()(torch.randn(5, 4, 16))
    assert first.picks.shape == (2, 3) and second.picks.shape == (5, 3)
    assert set(vars(stack)) == attributes and all(torch.equal(v, state[k]) for k, v in stack.state_dict().items())


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.moe_layers=[1]"], "has no MoE FFN"),
        (["schedule=layerwise"], "needs schedule=end_to_end"),
        (["model.depth_router.identity_blocks=-1"], "identity_blocks >= 0"),
        (["model.depth_router.halt_epsilon=1.5"], "halt_epsilon=1.5 must be in"),
    ],
)
def test_bad_depth_router_configs_are_refused(pretrain_cfg, overrides, message):
    cfg = pretrain_cfg(["model=vit_depth", "model.patch_size=2", *overrides])
    with pytest.raises(ConfigError, match=message):
        build_backbone(cfg, image_size=8, channels=1)


@pytest.mark.slow
def test_depth_routed_vit_pretrains_and_finetunes_on_digits(tmp_path, pretrain_cfg, finetune_cfg):
    small = [
        "model=vit_depth",
        "model.dim=32",
        "model.depth=2",
        "trainer.max_epochs=1",
        "data.train_subset=256",
        "trainer.log_every_n_steps=1",
    ]
    run = run_pretrain(pretrain_cfg([*small, "trainer.knn_every_n_epochs=0"]), tmp_path / "pre")
    metrics = json.loads((run / "metrics.json").read_text())
    # every step picks a block or an identity: blocks per image = (1 - identity share) x steps (2, no halting)
    assert metrics["depth/blocks_per_image"] == pytest.approx((1 - metrics["depth/identity_share"]) * 2)
    assert metrics["depth/compute_saved"] == pytest.approx(1 - metrics["depth/blocks_per_image"] / 2)
    assert sum(v for k, v in metrics.items() if k.startswith("depth/order/s0/")) == pytest.approx(1.0)
    header = (run / "logs" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"depth/identity_share", "depth/blocks_per_image", "depth/compute_saved"} <= set(header)
    out = run_finetune(finetune_cfg([f"checkpoint={run}", "trainer.max_epochs=1", "data.train_subset=256"]), tmp_path / "ft", overrides=[])
    assert "depth/blocks_per_image" in json.loads((out / "metrics.json").read_text())
    scratch = finetune_cfg([*small, "model.depth_router.halting=true"])
    ft = json.loads((run_finetune(scratch, tmp_path / "ft_act", overrides=[]) / "metrics.json").read_text())
    assert 0.0 < ft["depth/ponder_cost"] - ft["depth/steps_per_image"] <= 1.0  # ponder cost n + R: the remainder R is in (0, 1]
