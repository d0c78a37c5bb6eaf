"""The MoE layer: drop-in FFN, sort-and-gather execution, losses and load."""

from __future__ import annotations

import pytest
import torch

from ssroute.errors import ConfigError
from ssroute.layers.block import TransformerBlock
from ssroute.layers.mlp import FeedForward
from ssroute.moe import MoELayer, build_moe
from ssroute.routing import Routing, build_router


def test_one_expert_equals_the_dense_ffn() -> None:
    torch.manual_seed(0)
    moe = build_moe(dim=8, hidden=32, num_experts=1, router="token_choice", capacity_factor=None)
    dense = FeedForward(8, 32)
    with torch.no_grad():
        moe.experts.w_in[0].copy_(dense.fc1.weight.t())
        moe.experts.b_in[0].copy_(dense.fc1.bias)
        moe.experts.w_out[0].copy_(dense.fc2.weight.t())
        moe.experts.b_out[0].copy_(dense.fc2.bias)
    x = torch.randn(3, 7, 8)
    assert torch.allclose(moe(x), dense(x), atol=1e-6)


def test_drop_in_for_a_transformer_block() -> None:
    block = TransformerBlock(dim=16, heads=4, ffn=build_moe(dim=16, hidden=32, num_experts=4, router="expert_choice"))
    x = torch.randn(2, 9, 16, requires_grad=True)
    out, routing = block(x)
    out.sum().backward()
    assert routing is not None and routing.num_tokens == 18  # the block hands its routing up
    assert out.shape == x.shape and x.grad is not None


def test_sparse_path_never_builds_dense_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def forbidden(self, capacity=None):
        raise AssertionError("the MoE layer must not build [tokens, experts, capacity] tensors")

    monkeypatch.setattr(Routing, "dispatch_combine", forbidden)
    moe = build_moe(dim=8, hidden=16, num_experts=4, router="token_choice", k=2)
    original = moe.experts.forward
    moe.experts.forward = lambda x, sizes, context: calls.append((len(sizes), context)) or original(x, sizes, context)
    _, routing = moe.forward_with_routing(torch.randn(2, 5, 8))
    assert len(calls) == 1 and calls[0][0] == 4  # one bank call, one block per expert
    context = calls[0][1]
    order = torch.argsort(routing.expert, stable=True)
    assert torch.equal(context.token_index, routing.token[order])
    assert torch.equal(context.image_index, routing.token[order] // 5)


def test_dropped_tokens_output_zero_and_load_is_reported() -> None:
    moe = build_moe(dim=8, hidden=16, num_experts=4, router="token_choice", capacity_factor=0.25)
    out, routing = moe.forward_with_routing(torch.randn(2, 16, 8))
    dropped = routing.experts_per_token() == 0
    assert int(dropped.sum()) == int(routing.num_dropped) > 0
    assert bool((out.view(-1, 8)[dropped] == 0).all())
    load = routing.load()
    assert load.shape == (4,) and int(load.sum()) == routing.token.numel()
    assert int(load.max()) <= 2 * routing.capacity  # 2 images


def test_soft_moe_layer_and_load() -> None:
    moe = build_moe(dim=8, hidden=16, num_experts=4, router="soft_moe", slots_per_expert=2)
    x = torch.randn(3, 5, 8, requires_grad=True)
    out, routing = moe.forward_with_routing(x)
    out.sum().backward()
    assert out.shape == x.shape and moe.router.slot_embed.grad is not None
    assert routing.load().tolist() == [6, 6, 6, 6]


def test_the_backbone_returns_the_sum_of_its_layers_aux_losses() -> None:
    from ssroute.models.vit import ViT

    routers = ["token_choice", "vq"]
    vit = ViT(image_size=8, channels=1, dim=8, depth=3, heads=2, patch_size=2,
              ffn_factory=lambda i: build_moe(dim=8, hidden=16, num_experts=4, router=routers[i]) if i < 2 else FeedForward(8, 16))  # fmt: skip
    _, aux = vit(torch.randn(2, 1, 8, 8))
    assert sorted(aux.routings) == [0, 1]
    total = aux.losses["router_aux"]
    assert torch.allclose(total, aux.routings[0].aux_loss + aux.routings[1].aux_loss) and float(total.detach()) > 0
    _, dense = ViT(image_size=8, channels=1, dim=8, depth=1, heads=2, patch_size=2)(torch.randn(2, 1, 8, 8))
    assert "router_aux" not in dense.losses and dense.routings == {}
    _, frozen = vit(torch.randn(2, 1, 8, 8), frozen_below=1)  # a frozen block's loss cannot train anything
    assert torch.allclose(frozen.losses["router_aux"], frozen.routings[1].aux_loss)


def test_the_layer_keeps_no_state_between_forwards() -> None:
    moe = build_moe(dim=8, hidden=16, num_experts=4, router="token_choice")
    before = {k: v.clone() for k, v in moe.state_dict().items()}
    attributes = set(vars(moe))
    moe(torch.randn(2, 5, 8))
    assert set(vars(moe)) == attributes and all(torch.equal(v, before[k]) for k, v in moe.state_dict().items())


def test_routing_groups_of_several_images() -> None:
    moe = build_moe(dim=8, hidden=16, num_experts=4, router="token_choice", capacity_factor=1.0, group_images=2)
    _, routing = moe.forward_with_routing(torch.randn(4, 6, 8) + 3.0)
    assert routing.tokens_per_group == 12 and routing.capacity == 3  # ceil(1.0 * 12 / 4): shared by the two images of a group
    assert int(routing.group_loads().max()) <= 3


def test_options_go_to_router_or_experts_by_name() -> None:
    moe = build_moe(dim=8, hidden=16, num_experts=4, router="token_choice", k=2, depth=3, activation="relu")
    assert moe.router.k == 2 and moe.experts.depth == 3
    with pytest.raises(ConfigError, match=r"'nope' is valid for neither router 'token_choice'.*nor experts 'mlp'"):
        build_moe(dim=8, hidden=16, num_experts=4, nope=1)
    with pytest.raises(ConfigError, match="unknown router 'nope'; choose one of:.*token_choice"):
        build_moe(dim=8, hidden=16, num_experts=4, router="nope")
    with pytest.raises(ConfigError, match="k=8"):
        build_moe(dim=8, hidden=16, num_experts=4, k=8)


def test_router_and_experts_must_agree() -> None:
    from ssroute.experts import build_experts

    with pytest.raises(ConfigError, match="num_experts=4 but the experts"):
        MoELayer(build_router("hash", dim=8, num_experts=4), build_experts("mlp", dim=8, hidden=16, num_experts=3))


def test_lazy_entry_point() -> None:
    import ssroute

    assert isinstance(ssroute.build_moe(dim=8, hidden=16, num_experts=2), MoELayer)


def test_router_context_mixes_the_image_mean_into_the_router_input_only():
    from ssroute.moe import build_moe

    torch.manual_seed(0)
    x = torch.randn(3, 6, 16)
    plain = build_moe(dim=16, hidden=32, num_experts=4, capacity_factor=None, noise_std=0.0)
    whole = build_moe(dim=16, hidden=32, num_experts=4, capacity_factor=None, noise_std=0.0, router_context=1.0)
    whole.load_state_dict(plain.state_dict())
    y_plain, r_plain = plain.forward_with_routing(x)
    y_whole, r_whole = whole.forward_with_routing(x)
    chosen = r_whole.executed_top1().view(3, 6)
    assert bool((chosen == chosen[:, :1]).all())  # the image mean alone decides: one expert per image
    assert not torch.allclose(y_whole[:, 0], y_whole[:, 1])  # the experts still run on each token
    none = build_moe(dim=16, hidden=32, num_experts=4, capacity_factor=None, noise_std=0.0, router_context=0.0)
    none.load_state_dict(plain.state_dict())
    assert torch.equal(none(x), y_plain)


def test_router_context_outside_zero_one_is_one_sentence():
    from ssroute.errors import ConfigError
    from ssroute.moe import build_moe

    with pytest.raises(ConfigError, match="router_context=1.5"):
        build_moe(dim=8, hidden=8, num_experts=2, router_context=1.5)
