"""Distillation losses: zero at the teacher, hand values, CoFI's ordered layer matching, and distillation that learns."""

from __future__ import annotations

import math

import torch

from ssroute.prune.distill import hidden_loss, layer_alignment, layerwise_loss, output_loss, sublayer_losses


def test_output_losses_hand_values() -> None:
    teacher = torch.tensor([[0.0, math.log(3.0)]])  # softmax (1/4, 3/4) at T = 1
    student = torch.zeros(1, 2)  # (1/2, 1/2)
    kl = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert abs(float(output_loss(student, teacher, "kl", temperature=1.0)) - kl) < 1e-6
    assert float(output_loss(teacher, teacher, "kl")) == 0.0
    assert abs(float(output_loss(student, teacher, "mse")) - math.log(3.0) ** 2 / 2) < 1e-6


def test_hidden_kl_is_per_token_over_the_feature_axis() -> None:
    torch.manual_seed(0)
    t = torch.randn(2, 3, 5)
    assert float(hidden_loss(t, t, "kl")) < 1e-7
    shifted = t + 7.0  # softmax over features ignores a constant shift; MSE does not
    assert float(hidden_loss(shifted, t, "kl")) < 1e-6 and float(hidden_loss(shifted, t, "mse")) == 49.0


def test_layer_alignment_keeps_the_order_and_skips_removed_layers() -> None:
    losses = torch.tensor([[0.1, 0.2, 9.0, 9.0], [9.0, 5.0, 0.1, 0.2], [9.0, 9.0, 0.3, 0.1]])
    assert layer_alignment(losses).tolist() == [0, 2, 3]
    assert layer_alignment(losses, allowed=torch.tensor([True, True, False, True])).tolist() == [0, 1, 3]
    # without the order constraint teacher 1 and 2 would both take student 2; with it teacher 1 goes below
    assert layer_alignment(torch.tensor([[0.1, 9.0, 9.0], [9.0, 0.5, 0.1], [9.0, 9.0, 0.1]])).tolist() == [0, 1, 2]


def test_layerwise_loss_sums_the_matched_pairs_and_trains_a_student() -> None:
    torch.manual_seed(0)
    teacher = [torch.randn(4, 5, 8) for _ in range(3)]
    transform = torch.nn.Linear(8, 8)
    student = [torch.randn(4, 5, 8) for _ in range(3)]
    loss, alignment = layerwise_loss([transform(s) for s in student], teacher)
    by_hand = sum(hidden_loss(transform(student[int(a)]), t) for a, t in zip(alignment, teacher, strict=True))
    assert torch.allclose(loss, by_hand)
    optimizer = torch.optim.Adam(transform.parameters(), lr=0.05)
    first = float(loss.detach())
    for _ in range(100):
        loss, _ = layerwise_loss(
            [transform(s) for s in student], [transform(s).detach() * 0 + t for s, t in zip(student, teacher, strict=True)]
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss) < first
    assert sublayer_losses(teacher, teacher).tolist() == [0.0, 0.0, 0.0]
