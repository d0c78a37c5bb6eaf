"""Hard-concrete gates: the expected L0 is the Monte-Carlo one, temperature and sparsity, deterministic counts."""

from __future__ import annotations

import pytest
import torch

from ssroute.errors import ConfigError
from ssroute.prune.hard_concrete import HardConcrete


def test_expected_l0_matches_a_monte_carlo_estimate() -> None:
    torch.manual_seed(0)
    gate = HardConcrete(6, rows=2)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.linspace(-3, 3, 12).view(2, 6))
    samples = torch.stack([gate.sample() for _ in range(20000)])
    monte_carlo = (samples != 0).float().mean(0)
    assert torch.allclose(monte_carlo, gate.prob_nonzero().detach(), atol=0.015)
    assert abs(float((samples != 0).float().sum((1, 2)).mean()) - float(gate.l0().detach())) < 0.05


def test_samples_are_exactly_zero_or_one_with_positive_probability() -> None:
    torch.manual_seed(0)
    gate = HardConcrete(1000, droprate_init=0.5)
    z = gate.sample()
    assert bool((z == 0).any()) and bool((z == 1).any()) and bool(((z > 0) & (z < 1)).any())


def test_lower_temperature_makes_deterministic_masks_sparser() -> None:
    torch.manual_seed(0)
    log_alpha = torch.randn(2, 64) * 1.5 - 0.5
    kept = []
    for temperature in (1.0, 2.0 / 3.0, 0.3, 0.1):
        gate = HardConcrete(64, rows=2, temperature=temperature)
        with torch.no_grad():
            gate.log_alpha.copy_(log_alpha)
        kept.append(int((gate.deterministic() != 0).sum()))
    assert kept == sorted(kept, reverse=True) and kept[0] > kept[-1]


def test_deterministic_gates_keep_round_of_the_expected_count_per_row_largest_first() -> None:
    torch.manual_seed(0)
    gate = HardConcrete(10, rows=3)
    with torch.no_grad():
        gate.log_alpha.normal_(0, 3)
    z = gate.deterministic()
    expected = gate.prob_nonzero().detach().sum(-1).round()
    assert torch.equal((z != 0).sum(-1).float(), expected)
    for row, values in zip(gate.log_alpha.detach(), z, strict=True):  # every kept gate has a larger log_alpha than every removed one
        kept, removed = row[values != 0], row[values == 0]
        assert kept.numel() == 0 or removed.numel() == 0 or kept.min() > removed.max()
    binary = HardConcrete(10, rows=3, binary=True)
    binary.load_state_dict(gate.state_dict())
    assert set(binary.deterministic().unique().tolist()) <= {0.0, 1.0}


def test_bad_settings_are_one_sentence() -> None:
    with pytest.raises(ConfigError, match=r"droprate_init=1.0 must be strictly between 0 and 1"):
        HardConcrete(4, droprate_init=1.0)
    with pytest.raises(ConfigError, match=r"l0_temperature=0.0 must be positive"):
        HardConcrete(4, temperature=0.0)
