"""router.random_fraction: a share of tokens, drawn anew on every call, sent to random experts — for any sparse router."""

from __future__ import annotations

import pytest
import torch

from ssroute.errors import ConfigError
from ssroute.moe import build_moe, dense_reference
from ssroute.routing import ROUTERS, build_router
from tests.conftest import compose_config

DIM, EXPERTS, IMAGES, TOKENS = 16, 4, 3, 10
SPARSE = [name for name in ROUTERS.names() if not ROUTERS.get(name).soft]
PER_TOKEN_K = [
    ("token_choice", {"k": 2}),
    ("sinkhorn_token_choice", {}),
    ("expert_choice", {}),
    ("top_p", {}),
    ("vq", {}),
    ("hungarian", {}),
]


def _moe(name: str, fraction: float, **options):
    torch.manual_seed(0)
    return build_moe(dim=DIM, hidden=24, num_experts=EXPERTS, router=name, random_fraction=fraction, **options)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", SPARSE)
def test_fraction_zero_is_the_router_itself(name: str, train: bool) -> None:
    plain, zero = _moe(name, 0.0).train(train), _moe(name, 0.0).train(train)
    assert zero.router.random_fraction == 0.0
    x = torch.randn(IMAGES, TOKENS, DIM)
    torch.manual_seed(1)
    out_a, a = plain.forward_with_routing(x)
    after_a = torch.rand(1)
    torch.manual_seed(1)
    out_b, b = zero.forward_with_routing(x)
    assert torch.rand(1) == after_a  # no random draw at p = 0
    for field in ("probs", "token", "expert", "weight"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert torch.equal(out_a, out_b) and a.capacity == b.capacity


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("name", "options"), PER_TOKEN_K, ids=[n for n, _ in PER_TOKEN_K])
def test_fraction_one_is_the_random_router(name: str, options: dict, train: bool) -> None:
    mixed = _moe(name, 1.0, **options).train(train)
    k = int(mixed.router.experts_per_token(TOKENS)) if options.get("k") else 1
    random = build_moe(dim=DIM, hidden=24, num_experts=EXPERTS, router="random", k=k).train(train)
    random.experts.load_state_dict(mixed.experts.state_dict())
    x = torch.randn(IMAGES, TOKENS, DIM)
    out_m, m = mixed.forward_with_routing(x)
    out_r, r = random.forward_with_routing(x)
    assert torch.equal(m.token, r.token) and torch.equal(m.expert, r.expert) and torch.equal(m.weight, r.weight)
    assert int(m.num_dropped) == 0 and m.capacity is None
    assert torch.allclose(out_m, out_r, atol=1e-6)
    assert torch.allclose(m.probs.sum(-1), torch.ones(IMAGES * TOKENS))  # probs stay the learned router's


def test_a_share_of_tokens_is_rerouted_and_the_rest_keep_their_assignments() -> None:
    moe = _moe("token_choice", 0.25, k=2, capacity_factor=None).train()
    x = torch.randn(40, 25, DIM)
    torch.manual_seed(3)
    plain = moe.router.forward(x.view(-1, DIM), tokens_per_group=25)  # forward alone: no random share
    torch.manual_seed(3)
    mixed = moe.router(x.view(-1, DIM), tokens_per_group=25)
    pairs = lambda r: {(int(t), int(e)): float(w) for t, e, w in zip(r.token, r.expert, r.weight.detach(), strict=True)}  # noqa: E731
    learned, got = pairs(plain), pairs(mixed)
    rerouted = {t for (t, e), w in got.items() if (t, e) not in learned or learned[(t, e)] != w}
    share = len(rerouted) / 1000
    assert 0.20 < share < 0.30, share  # ~ Bernoulli(0.25) over 1000 tokens
    for (t, e), w in got.items():
        if t not in rerouted:
            assert learned[(t, e)] == w  # an untouched token keeps its learned pair and weight
        else:
            assert w == 0.5  # k = 2 random experts, weight 1/k
    assert all(int((mixed.token == t).sum()) == 2 for t in rerouted)
    again = moe.router(x.view(-1, DIM), tokens_per_group=25)
    assert not torch.equal(again.expert, mixed.expert)  # resampled on every call
    assert torch.allclose(moe.execute(x.view(-1, DIM), mixed), dense_reference(moe.experts, x.view(-1, DIM), mixed), atol=1e-5)


def test_evaluation_draws_the_same_share_on_every_call_training_a_new_one() -> None:
    moe = _moe("token_choice", 0.5).eval()
    x = torch.randn(200, DIM)
    first, second = moe.router(x, tokens_per_group=20), moe.router(x, tokens_per_group=20)
    assert torch.equal(first.expert, second.expert) and torch.equal(first.token, second.token)
    moe.train()
    assert not torch.equal(moe.router(x, tokens_per_group=20).token, moe.router(x, tokens_per_group=20).token)


def test_an_image_router_reroutes_whole_images() -> None:
    moe = _moe("image", 0.5, k=1)
    routing = moe.router(torch.randn(200 * 6, DIM), tokens_per_group=6)
    experts = routing.expert.view(200, 6)
    assert bool((experts == experts[:, :1]).all())  # every token of an image still shares its expert


@pytest.mark.parametrize(
    ("fraction", "name", "message"), [(1.5, "token_choice", "between 0 and 1"), (0.1, "soft_moe", "discrete assignments")]
)
def test_bad_fractions_get_one_sentence(fraction: float, name: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_router(name, dim=DIM, num_experts=EXPERTS, random_fraction=fraction)


def test_the_config_key_reaches_the_router() -> None:
    from ssroute.config import resolve_data_defaults
    from ssroute.data import build_data
    from ssroute.models import build_backbone

    cfg = compose_config("pretrain", ["model=vit_tiny", "model.moe_layers=[1]", "router.random_fraction=0.25"])
    data = build_data(cfg.data, 0)
    resolve_data_defaults(cfg, data.image_size)
    backbone = build_backbone(cfg, data.image_size, data.channels)
    assert backbone.blocks[1].ffn.router.random_fraction == 0.25
