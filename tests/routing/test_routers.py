"""Invariants every registered router must satisfy (a new router is tested the day it is added)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from ssroute.errors import ConfigError
from ssroute.moe import build_moe, dense_reference
from ssroute.registry import option_names
from ssroute.routing import COMMON_OPTIONS, ROUTERS, Router, Routing, build_router

DIM, EXPERTS, IMAGES, TOKENS = 16, 4, 3, 10
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "router"


def _variants() -> list[tuple[str, dict]]:
    cases = []
    for name in ROUTERS.names():
        cases.append((name, {}))
        if "capacity_factor" in option_names(ROUTERS.get(name), ("dim", "num_experts")) and name != "hungarian":
            cases.append((name, {"capacity_factor": 0.5}))  # binding capacity: drops must respect it
    cases += [("token_choice", {"k": 2, "batch_priority": True}), ("hungarian", {"solver": "sinkhorn"})]
    cases += [("hungarian", {"capacity_factor": 0.5, "overflow": "drop"}), ("vq", {"update": "gradient", "codes_per_expert": 2})]
    cases += [("threshold", {"score": "relu"}), ("soft_moe", {"slots_per_expert": 3, "normalize": True})]
    cases += [
        ("token_choice", {"random_fraction": 0.5, "k": 2}),
        ("expert_choice", {"random_fraction": 0.5}),
        ("image", {"random_fraction": 0.5}),
    ]
    return cases


def _route(name: str, options: dict, train: bool = True) -> tuple[torch.nn.Module, torch.Tensor, Routing]:
    torch.manual_seed(0)
    moe = build_moe(dim=DIM, hidden=24, num_experts=EXPERTS, router=name, **options).train(train)
    x = 2 * torch.randn(IMAGES * TOKENS, DIM)
    return moe, x, moe.router(x, tokens_per_group=TOKENS)


def _id(value: str | dict) -> str:
    return value if isinstance(value, str) else ",".join(f"{k}={v}" for k, v in value.items())


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("name", "options"), _variants(), ids=_id)
def test_routing_invariants(name: str, options: dict, train: bool) -> None:
    moe, x, routing = _route(name, options, train)
    total = IMAGES * TOKENS
    assert routing.probs.shape == (total, EXPERTS)
    assert torch.allclose(routing.probs.sum(-1), torch.ones(total), atol=1e-5)
    assert bool((routing.probs >= 0).all())
    pairs = routing.token.shape[0]
    assert routing.token.shape == routing.expert.shape == routing.weight.shape == (pairs,)
    assert routing.token.dtype == routing.expert.dtype == torch.long
    assert bool(torch.isfinite(routing.weight).all()) and bool((routing.weight >= 0).all())
    assert bool((routing.token >= 0).all() and (routing.token < total).all())
    assert bool((routing.expert >= 0).all() and (routing.expert < EXPERTS).all())
    assert torch.unique(routing.token * EXPERTS + routing.expert).numel() == pairs, "duplicate (token, expert) pairs"
    assert routing.aux_loss.shape == () and bool(torch.isfinite(routing.aux_loss))
    assert int(routing.num_dropped) == int((routing.experts_per_token() == 0).sum())
    if routing.is_soft:
        assert routing.dispatch_weights.shape[-1] == routing.capacity
    elif routing.capacity is not None:
        assert int(routing.group_loads().max()) <= routing.capacity
    if "capacity_factor" in options and routing.capacity is not None and not routing.is_soft:
        assert int(routing.group_loads().max()) == routing.capacity  # 0.5 must bind
    # sparse execution == the dense dispatch/combine reference of the unified formulation
    sparse = moe.execute(x, routing)
    dense = dense_reference(moe.experts, x, routing)
    assert torch.allclose(sparse, dense, atol=1e-5), (sparse - dense).abs().max()
    dropped = routing.experts_per_token() == 0
    assert bool((sparse[dropped] == 0).all()), "dropped tokens must give output 0 (the residual carries them)"


@pytest.mark.parametrize("name", ROUTERS.names())
def test_layer_shape_and_router_gradients(name: str) -> None:
    moe, _, _ = _route(name, {})
    x = torch.randn(IMAGES, TOKENS, DIM, requires_grad=True)
    out, routing = moe.forward_with_routing(x)
    assert out.shape == x.shape
    (out.square().sum() + routing.aux_loss).backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
    learned = [p for p in moe.router.parameters() if p.requires_grad]
    assert moe.router.learned == (name not in ("hash", "random"))
    if moe.router.learned and learned:
        for param in learned:
            assert param.grad is not None and bool(torch.isfinite(param.grad).all())
            assert bool((param.grad != 0).any()), f"no gradient reaches {name}'s router"
    assert isinstance(moe.router, Router) and moe.router.per_token == (name != "image")  # image routes whole images
    if not moe.router.per_token:  # ... so every token of an image shares its experts
        chosen = routing.expert.view(IMAGES, TOKENS, -1)
        assert bool((chosen == chosen[:, :1]).all())


@pytest.mark.parametrize("name", ROUTERS.names())
def test_config_file_matches_router(name: str) -> None:
    config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    assert config.pop("name") == name
    assert set(config) == set(option_names(ROUTERS.get(name), ("dim", "num_experts"))) | set(COMMON_OPTIONS)
    build_router(name, dim=DIM, num_experts=EXPERTS, **config)


def test_unknown_router_lists_valid_names() -> None:
    with pytest.raises(ConfigError, match="token_choice"):
        build_router("nope", dim=DIM, num_experts=EXPERTS)


def test_unknown_option_names_router_and_valid_options() -> None:
    with pytest.raises(ConfigError, match=r"router 'expert_choice' has no option 'k'.*capacity_factor"):
        build_router("expert_choice", dim=DIM, num_experts=EXPERTS, k=2)


@pytest.mark.parametrize("name", ["token_choice", "sinkhorn_token_choice", "random"])
def test_k_larger_than_experts(name: str) -> None:
    with pytest.raises(ConfigError, match="k=5"):
        build_router(name, dim=DIM, num_experts=EXPERTS, k=5)


@pytest.mark.parametrize("name", [n for n in ROUTERS.names() if "capacity_factor" in option_names(ROUTERS.get(n), ())])
@pytest.mark.parametrize("factor", [0.0, -1.0])
def test_nonpositive_capacity_factor(name: str, factor: float) -> None:
    with pytest.raises(ConfigError, match="capacity_factor"):
        build_router(name, dim=DIM, num_experts=EXPERTS, capacity_factor=factor)


def test_group_size_must_divide_tokens() -> None:
    router = build_router("token_choice", dim=DIM, num_experts=EXPERTS)
    with pytest.raises(ConfigError, match="tokens_per_group"):
        router(torch.randn(10, DIM), tokens_per_group=3)
