"""Routing fluctuation: hand-made snapshot sequences, top-1 extraction, and the callback on tiny runs (incl. kill and resume)."""

import pytest
import torch

from ssroute.eval.fluctuation import fluctuation, fluctuation_metrics, last_change_steps, top1_experts
from ssroute.routing.base import sparse_routing

# 4 snapshots x 5 tokens. token 0 never moves, 1 moves once early, 2 moves every time, 3 moves last, 4 moves twice
SNAPSHOTS = torch.tensor(
    [
        [0, 1, 2, 3, 0],
        [0, 2, 3, 3, 1],
        [0, 2, 0, 3, 1],
        [0, 2, 1, 0, 2],
    ]
)
STEPS = torch.tensor([0, 25, 50, 60])


def test_fluctuation_counts_changed_tokens_per_interval():
    # interval 1: tokens 1, 2, 4 changed; interval 2: token 2; interval 3: tokens 2, 3, 4
    assert fluctuation(SNAPSHOTS).tolist() == [3 / 5, 1 / 5, 3 / 5]
    assert fluctuation(SNAPSHOTS[:1]).numel() == 0
    assert fluctuation(torch.zeros(3, 7, dtype=torch.long)).tolist() == [0.0, 0.0]


def test_last_change_step_is_the_last_snapshot_that_differs_and_the_first_step_when_never():
    assert last_change_steps(SNAPSHOTS, STEPS).tolist() == [0, 25, 60, 60, 60]
    assert last_change_steps(SNAPSHOTS[:3], STEPS[:3]).tolist() == [0, 25, 50, 0, 25]
    assert last_change_steps(SNAPSHOTS[:1], STEPS[:1]).tolist() == [0] * 5
    with pytest.raises(ValueError, match="one per snapshot"):
        last_change_steps(SNAPSHOTS, STEPS[:2])


def test_fluctuation_metrics_report_the_last_interval_per_block_and_their_mean():
    still = torch.zeros(4, 5, dtype=torch.long)
    metrics = fluctuation_metrics({"blocks.1.ffn": SNAPSHOTS, "blocks.3.ffn": still}, STEPS)
    assert metrics == {
        "block1/routing_fluctuation": 0.6,
        "block1/routing_last_change_step_mean": (0 + 25 + 60 + 60 + 60) / 5,
        "block3/routing_fluctuation": 0.0,
        "block3/routing_last_change_step_mean": 0.0,
        "routing_fluctuation": 0.3,
    }
    assert fluctuation_metrics({"blocks.1.ffn": SNAPSHOTS[:1]}, STEPS[:1]) == {}


def test_top1_is_the_heaviest_kept_assignment_and_dropped_tokens_fall_back_to_probs():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [1 / 3, 1 / 3, 1 / 3], [0.1, 0.8, 0.1]])
    # token 0: two kept experts, expert 1 weighs more; token 1: dropped; token 2: uniform probs, assigned 2; token 3: kept 1
    token, expert, weight = torch.tensor([0, 0, 2, 3]), torch.tensor([0, 1, 2, 1]), torch.tensor([0.3, 0.5, 1.0, 0.8])
    routing = sparse_routing(probs, token, expert, weight, tokens_per_group=4)
    assert top1_experts(routing).tolist() == [1, 2, 2, 1]
