"""Mixed expert banks: each expert its own type behind one router, on the layer's one sorted dispatch."""

from __future__ import annotations

import pytest
import torch

from ssroute.errors import ConfigError
from ssroute.experts import ExpertContext, build_experts
from ssroute.moe import build_moe, dense_reference, model_accounting

TYPES = [["mlp", "mlp", "lut", "attention"], ["mlp", "conv", "lut", "attention"], ["hyper", "conv"]]


@pytest.mark.parametrize("router", ["token_choice", "expert_choice", "soft_moe", "image"])
@pytest.mark.parametrize("types", TYPES, ids=lambda t: ",".join(t))
def test_matches_the_dense_reference(types: list[str], router: str) -> None:
    torch.manual_seed(0)
    options = {"capacity_factor": 0.75} if router == "token_choice" else {}  # a binding capacity: some slots empty, some tokens dropped
    moe = build_moe(dim=16, hidden=24, num_experts=4, router=router, experts="mixed", types=types, **options).train()
    flat = 2 * torch.randn(3 * 9, 16)
    routing = moe.router(flat, tokens_per_group=9)
    sparse, dense = moe.execute(flat, routing), dense_reference(moe.experts, flat, routing)
    assert torch.allclose(sparse, dense, atol=1e-5), (sparse - dense).abs().max()


def test_each_expert_is_its_types_bank() -> None:
    torch.manual_seed(0)
    bank = build_experts("mixed", dim=8, hidden=16, num_experts=6, types=["mlp", "conv", "lut"]).eval()
    assert bank.expert_types == ["mlp", "conv", "lut", "mlp", "conv", "lut"]
    token = torch.tensor([0, 2, 3, 5, 6])
    x = torch.randn(5, 8)
    context = ExpertContext(token, 4, 2)
    for expert in range(6):
        name = bank.type_of(expert)
        local = bank.members[name].index(expert)
        sizes = [5 if e == expert else 0 for e in range(6)]
        own = [5 if j == local else 0 for j in range(bank.banks[name].num_experts)]
        assert torch.allclose(bank(x, sizes, context), bank.banks[name](x, own, context), atol=1e-6), expert


def test_rows_of_several_types_come_back_in_their_places() -> None:
    torch.manual_seed(0)
    bank = build_experts("mixed", dim=8, hidden=16, num_experts=4, types=["mlp", "lut"]).eval()
    x = torch.randn(7, 8)
    sizes = [2, 1, 3, 1]  # expert order mlp, lut, mlp, lut: rows of one type are not contiguous
    out = bank(x, sizes, None)
    starts = [0, 2, 3, 6]
    for expert, (start, size) in enumerate(zip(starts, sizes, strict=True)):
        alone = [size if e == expert else 0 for e in range(4)]
        assert torch.allclose(out[start : start + size], bank(x[start : start + size], alone, None), atol=1e-6)


def test_accounting_sums_the_per_type_counts() -> None:
    moe = build_moe(dim=16, hidden=32, num_experts=8, router="token_choice", k=2, experts="mixed", types=["mlp", "mlp", "lut", "attention"])
    stats = model_accounting(moe, tokens_per_image=16)
    names = ["mlp", "lut", "attention"]
    assert sum(stats[f"experts/{n}/params"] for n in names) == stats["params_experts"]
    assert sum(stats[f"experts/{n}/flops_per_token"] for n in names) == pytest.approx(stats["flops_experts_per_token"], rel=1e-12)
    counts = {"mlp": 4, "lut": 2, "attention": 2}
    for name in names:  # each type costs what a bank of its own of that many experts costs
        alone = build_experts(name, dim=16, hidden=32, num_experts=counts[name])
        assert stats[f"experts/{name}/params"] == sum(p.numel() for p in alone.parameters())
        assert stats[f"experts/{name}/flops_per_token"] == pytest.approx(2 * counts[name] / 8 * alone.flops_per_row(16))
    plain = model_accounting(build_moe(dim=16, hidden=32, num_experts=8, k=2), tokens_per_image=16)
    assert (
        plain["experts/mlp/params"] == plain["params_experts"] and plain["experts/mlp/flops_per_token"] == plain["flops_experts_per_token"]
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"types": ["mlp"] * 5}, "types lists 5 types for num_experts=4"),
        ({"types": ["mlp", "mixed"]}, "types cannot contain mixed"),
        ({"types": ["mlp", "gru"]}, "unknown expert bank 'gru'"),
        ({"types": ["mlp"], "options": {"lut": {"key": "hash"}}}, "options for lut, which is not in types"),
        ({"types": ["mlp", "lut"], "options": {"lut": {"bits": 3}}}, "expert bank 'lut' has no option 'bits'"),
    ],
)
def test_bad_settings_get_one_sentence(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_experts("mixed", dim=8, hidden=16, num_experts=4, **options)


def test_per_type_options_reach_their_bank() -> None:
    bank = build_experts(
        "mixed", dim=8, hidden=16, num_experts=2, types=["lut", "attention"], options={"lut": {"key": "hash"}, "attention": {"heads": 2}}
    )
    assert bank.banks["lut"].key == "hash" and bank.banks["attention"].heads == 2
