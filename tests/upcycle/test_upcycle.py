"""Upcycling: the partition is exact at k = E, selection routers, and checkpoints finetune accepts."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from ssroute.errors import ConfigError
from ssroute.layers.mlp import FeedForward
from ssroute.models import build_backbone
from ssroute.moe import MoELayer
from ssroute.routing import build_router
from ssroute.upcycle import activation_mass, experts_from_ffn, neuron_groups, train_selection_router
from ssroute.upcycle.run import save_upcycled, upcycle_checkpoint


def _moe_from(ffn: FeedForward, experts: int, k: int, random: bool = False) -> MoELayer:
    bank, centroids = experts_from_ffn(ffn, experts)
    router = build_router("mlp_selection", dim=ffn.fc1.in_features, num_experts=experts, k=k, random=random)
    router.init_from_centroids(centroids[:, :-1], centroids[:, -1])
    return MoELayer(router, bank)


@pytest.mark.parametrize("activation", ["gelu", "relu"])
@pytest.mark.parametrize("random", [False, True])
def test_all_experts_reproduce_the_dense_ffn(activation: str, random: bool) -> None:
    torch.manual_seed(0)
    ffn = FeedForward(16, 64, activation)
    with torch.no_grad():
        ffn.fc2.bias.normal_()  # a non-trivial output bias must come out exactly once
    moe = _moe_from(ffn, 8, k=8, random=random)
    x = torch.randn(3, 7, 16)
    assert (moe(x) - ffn(x)).abs().max() < 1e-5


def test_fewer_experts_drop_exactly_the_unselected_neurons() -> None:
    torch.manual_seed(0)
    ffn = FeedForward(16, 64, "relu")
    groups, _ = neuron_groups(ffn, 4)
    moe = _moe_from(ffn, 4, k=2)
    x = torch.randn(2, 5, 16)
    out, routing = moe.forward_with_routing(x)
    out = out.view(10, 16)
    mask = torch.zeros(10, 64)
    for t, e in zip(routing.token.tolist(), routing.expert.tolist(), strict=True):
        mask[t, groups[e]] = 1.0
    hidden = ffn.act(ffn.fc1(x.view(10, 16))) * mask
    assert torch.allclose(out, ffn.fc2(hidden), atol=1e-5)  # selected neurons plus the whole fc2 bias


def test_hidden_must_divide_into_experts() -> None:
    with pytest.raises(
        ConfigError, match=r"num_experts=3 does not divide the FFN hidden width 64 \(model.mlp_ratio \* model.dim\); choose a divisor"
    ):
        neuron_groups(FeedForward(16, 64), 3)


def test_trained_selection_captures_more_activation_mass_than_random() -> None:
    torch.manual_seed(0)
    ffn = FeedForward(16, 64, "relu")
    groups, centroids = neuron_groups(ffn, 8)
    router = build_router("mlp_selection", dim=16, num_experts=8, k=2)
    router.init_from_centroids(centroids[:, :-1], centroids[:, -1])
    fit = train_selection_router(router, ffn, groups, torch.randn(4000, 16), steps=150)
    x = torch.randn(500, 16)
    mass = activation_mass(ffn, x, groups)
    share = lambda chosen: float((mass.gather(1, chosen).sum(-1) / mass.sum(-1)).mean())  # noqa: E731
    with torch.no_grad():
        trained = share(router.scores(x).topk(2, -1).indices)
    random = share(torch.rand(500, 8).topk(2, -1).indices)
    assert trained > random + 0.1 and fit["mass_captured_at_k"] > random + 0.1


@pytest.mark.slow
def test_checkpoint_round_trip_and_finetune_accepts_it(tmp_path, finetune_cfg) -> None:
    from ssroute.checkpoint import load_pretrained
    from ssroute.train.finetune import run_finetune

    cfg = finetune_cfg(["model.activation=relu"])
    cfg.model.patch_size = 2
    container = OmegaConf.to_container(cfg, resolve=True)
    torch.manual_seed(0)
    dense = build_backbone(cfg, 8, 1)
    source = tmp_path / "dense.ckpt"
    head = {"head.1.weight": torch.randn(10, 32)}
    torch.save(
        {"hyper_parameters": {"config": container}, "state_dict": {**{f"backbone.{k}": v for k, v in dense.state_dict().items()}, **head}},
        source,
    )
    with pytest.raises(ConfigError, match="num_experts=5 does not divide"):
        upcycle_checkpoint(str(source), num_experts=5)
    checkpoint = upcycle_checkpoint(str(source), num_experts=4, layers=[1], k=4, steps=5, images=16)
    run = save_upcycled(checkpoint, tmp_path / "up")
    config, state = load_pretrained(str(run))
    assert config["model"]["moe_layers"] == [1] and config["router"]["name"] == "mlp_selection"
    routed = build_backbone(OmegaConf.create(config), 8, 1)
    routed.load_state_dict(state)
    images = torch.randn(4, 1, 8, 8)
    assert (routed.eval()(images)[0] - dense.eval()(images)[0]).abs().max() < 1e-5  # k = E: the dense model
    assert torch.equal(
        torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]["head.1.weight"], head["head.1.weight"]
    )
    out = run_finetune(finetune_cfg([f"checkpoint={run}", "mode=linear", "trainer.max_epochs=1"]), tmp_path / "ft", overrides=[])
    assert (out / "metrics.json").is_file()
