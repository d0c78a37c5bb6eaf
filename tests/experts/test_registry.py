"""Every registered expert type through the MoE layer's sorted dispatch, with several routers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from ssroute.errors import ConfigError
from ssroute.experts import EXPERTS, build_experts
from ssroute.moe import build_moe, model_accounting
from ssroute.registry import option_names

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "experts"
ROUTERS = ["token_choice", "expert_choice", "soft_moe"]


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("name", EXPERTS.names())
def test_forward_backward_reaches_every_expert_parameter(name: str, router: str) -> None:
    torch.manual_seed(0)
    moe = build_moe(dim=16, hidden=32, num_experts=4, router=router, experts=name).train()
    x = torch.randn(3, 10, 16, requires_grad=True)
    out, routing = moe.forward_with_routing(x)
    assert out.shape == x.shape
    (out.square().sum() + routing.aux_loss).backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
    for pname, param in moe.experts.named_parameters():
        assert param.grad is not None, f"{name}: no gradient reaches {pname}"
        assert bool(torch.isfinite(param.grad).all()) and bool((param.grad != 0).any()), f"{name}: zero gradient for {pname}"
    stats = model_accounting(moe, tokens_per_image=10)
    assert stats["params_total"] >= stats["params_active"] > 0 and stats["flops_experts_per_token"] > 0


@pytest.mark.parametrize("name", EXPERTS.names())
def test_empty_blocks_and_eval_mode(name: str) -> None:
    bank = build_experts(name, dim=8, hidden=16, num_experts=4).eval()
    from ssroute.experts import ExpertContext

    out = bank(torch.randn(5, 8), [2, 0, 3, 0], ExpertContext(torch.tensor([0, 3, 1, 4, 2]), 3, 2))
    assert out.shape == (5, 8) and bool(torch.isfinite(out).all())
    assert bank(torch.randn(0, 8), [0, 0, 0, 0], ExpertContext(torch.zeros(0, dtype=torch.long), 3, 2)).shape == (0, 8)


@pytest.mark.parametrize("name", EXPERTS.names())
def test_config_file_matches_expert_options(name: str) -> None:
    config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    assert config.pop("name") == name
    assert set(config) == set(option_names(EXPERTS.get(name), ("dim", "hidden", "num_experts")))
    build_experts(name, dim=16, hidden=32, num_experts=4, **config)


def test_unknown_expert_type_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match="unknown expert bank 'deconv'; choose one of: attention, conv, hyper, lut, mixed, mlp"):
        build_experts("deconv", dim=8, hidden=16, num_experts=2)
    assert {"mlp", "lut", "attention", "hyper", "conv", "mixed"} <= set(EXPERTS.names())
