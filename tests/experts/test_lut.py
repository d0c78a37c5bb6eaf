"""Look-up-table experts: eval is a pure gather, codes learn through the straight-through mix, bad keys."""

from __future__ import annotations

import pytest
import torch

from ssroute.errors import ConfigError
from ssroute.experts import build_experts


def test_eval_output_is_a_row_of_the_value_table_of_the_nearest_code() -> None:
    torch.manual_seed(0)
    bank = build_experts("lut", dim=8, hidden=16, num_experts=2).eval()
    x = torch.randn(7, 8)
    out = bank(x, [3, 4], None)
    for e, (lo, hi) in enumerate([(0, 3), (3, 7)]):
        nearest = torch.cdist(x[lo:hi], bank.codebook[e]).argmin(-1)
        assert torch.equal(out[lo:hi], bank.values[e, nearest])


def test_eval_runs_without_any_matrix_multiply_of_the_value_table() -> None:
    # FlopCounterMode counts every matmul-like op (mm, addmm, bmm, matmul, einsum, F.linear, ...), however it is called
    from torch.utils.flop_counter import FlopCounterMode

    bank = build_experts("lut", dim=8, hidden=16, num_experts=2).eval()
    x = torch.randn(5, 8)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        bank(x, [2, 3], None)
    # the key search may cost a distance product [rows, dim] x [dim, codes]; nothing may touch the [codes, dim] values
    search = 2 * 5 * 8 * bank.values.shape[1]
    assert counter.get_total_flops() <= search, counter.get_flop_counts()
    mlp = build_experts("mlp", dim=8, hidden=16, num_experts=2).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as mlp_counter:
        mlp(x, [2, 3], None)
    assert mlp_counter.get_total_flops() > 0  # the counter does see the matmuls of an ordinary expert


def test_training_gradients_reach_codes_projection_values_and_inputs() -> None:
    torch.manual_seed(0)
    bank = build_experts("lut", dim=8, hidden=16, num_experts=2, key_dim=4, project=True, temperature=10.0).train()
    x = torch.randn(6, 8, requires_grad=True)
    bank(x, [3, 3], None).square().sum().backward()
    for param in (bank.codebook, bank.values, bank.proj.weight, x):
        assert param.grad is not None and bool((param.grad != 0).any())


def test_hash_key_same_sign_pattern_same_output() -> None:
    bank = build_experts("lut", dim=8, hidden=16, num_experts=1, key="hash", hash_bits=4).eval()
    assert bank.values.shape == (1, 16, 8)
    x = torch.randn(4, 8)
    out = bank(torch.cat([x, 3.0 * x]), [8], None)  # scaling keeps every projection's sign
    assert torch.equal(out[:4], out[4:])


def test_bad_key_configs_are_one_sentence_errors() -> None:
    with pytest.raises(ConfigError, match="key_dim=4 differs from the token width dim=8; set key_dim=8 or project=true"):
        build_experts("lut", dim=8, hidden=16, num_experts=2, key_dim=4)
    with pytest.raises(ConfigError, match="key='tree'"):
        build_experts("lut", dim=8, hidden=16, num_experts=2, key="tree")
    with pytest.raises(ConfigError, match="hash_bits=40"):
        build_experts("lut", dim=8, hidden=16, num_experts=2, key="hash", hash_bits=40)
