"""A pool routed over depth inside a stack (``model.stack=[ssl,depth,ssl]``): rotary positions, stages, losses, refusals."""

import json

import pytest
import torch

from ssroute.errors import ConfigError
from ssroute.layers.rope import AxialRope
from ssroute.models import build_backbone
from ssroute.models.depth_router import DepthRoutedStack, depth_stack
from ssroute.train.finetune import run_finetune
from ssroute.train.pretrain import run_pretrain
from ssroute.train.schedule import resolve_stack, stage_ranges

STAGE = ["model=ssl_route_ssl", "model.dim=32", "model.patch_size=2", "model.stack=[ssl,depth,ssl]", "model.ssl_layers=1"]


def rope_of(batch: int = 3, side: int = 4, head_dim: int = 8):
    centres = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(1, -1, 2).float() * 2 + 1
    centres = centres.expand(batch, -1, -1) + torch.randn(batch, 1, 2)  # each image shifted: positions differ per image
    return AxialRope(head_dim, patch_size=2)(centres)


def test_forced_dense_order_with_rotary_positions_is_exactly_the_blocks_in_order():
    torch.manual_seed(0)
    stack = DepthRoutedStack(dim=16, heads=2, pool_blocks=2, identity_blocks=1, max_steps=2).eval()
    with torch.no_grad():
        for block in stack.blocks:  # peaked attention (the init's is nearly uniform), so positions change the output
            block.attn.qkv.weight.mul_(50)
    x, rope = torch.randn(3, 16, 16), rope_of()
    out, _ = stack(x, choices=torch.tensor([[0, 1]] * 3), rope=rope)
    expected = stack.blocks[1](stack.blocks[0](x, None, rope)[0], None, rope)[0]
    assert torch.equal(out, expected)
    assert not torch.allclose(out, stack(x, choices=torch.tensor([[0, 1]] * 3))[0], atol=1e-2)  # the positions do reach attention


def test_per_token_routing_with_equal_choices_equals_per_image_routing_under_rotary_positions():
    torch.manual_seed(0)
    per_image = DepthRoutedStack(dim=16, heads=2, pool_blocks=2, identity_blocks=1, max_steps=3).eval()
    per_token = DepthRoutedStack(dim=16, heads=2, pool_blocks=2, identity_blocks=1, max_steps=3, per_token=True).eval()
    per_token.load_state_dict(per_image.state_dict())
    x, rope = torch.randn(3, 16, 16), rope_of()
    mask = torch.ones(3, 16, dtype=torch.bool)
    mask[1, 10:] = False
    choices = torch.tensor([[0, 2, 1], [1, 1, 0], [2, 0, 1]])
    expected, _ = per_image(x, mask, choices=choices, rope=rope)
    got, _ = per_token(x, mask, choices=choices, rope=rope)
    real = mask[..., None].expand_as(x)
    assert torch.allclose(got[real], expected[real], atol=1e-5)


def test_a_stack_with_a_depth_stage_resolves_and_hands_its_trace_up(pretrain_cfg):
    cfg = pretrain_cfg([*STAGE, "schedule=layerwise", "model.depth_router.halting=true", "trainer.max_epochs=3"])
    resolve_stack(cfg)
    assert list(cfg.model.depth_layers) == [1] and list(cfg.model.moe_layers) == [] and cfg.model.depth == 3
    assert stage_ranges(cfg.model) == [(0, 1), (1, 2), (2, 3)]
    backbone = build_backbone(cfg, image_size=8, channels=1).train()
    stack = depth_stack(backbone)
    assert stack is backbone.blocks[1] and stack.num_blocks == 1 and stack.max_steps == 1  # pool and steps default to ssl_layers
    images = torch.randn(4, 1, 8, 8)
    assert backbone(images, end=1)[1].depth is None  # a stage that stops below the pool does not run it
    _, aux = backbone(images, end=2, frozen_below=1)
    assert aux.depth.picks.shape == (4, 1) and "depth_ponder" in aux.losses  # the pool trains: its ponder cost is a loss
    _, aux = backbone(images, frozen_below=2)
    assert aux.depth is not None and "depth_ponder" not in aux.losses  # a frozen pool adds no loss


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.stack=[ssl,depth,depth]"], "at most one block"),
        (["model.stack=[]", "model.depth=3", "model.depth_layers=[1]", "model.moe_layers=[1]"], "cannot also be in model.moe_layers"),
        (["model.depth_layers=[0]"], "contradicts model.stack"),
    ],
)
def test_bad_depth_stages_are_refused(pretrain_cfg, overrides, message):
    cfg = pretrain_cfg([*STAGE, *overrides])
    with pytest.raises(ConfigError, match=message):
        resolve_stack(cfg)
        build_backbone(cfg, image_size=8, channels=1)


@pytest.mark.slow
def test_a_depth_stage_pretrains_layerwise_with_a_halting_selector_and_finetunes(tmp_path, pretrain_cfg, finetune_cfg, monkeypatch):
    from ssroute.train.pretrain_module import PretrainModule

    snapshots = {}
    monkeypatch.setattr(
        PretrainModule, "on_train_epoch_end", lambda self: snapshots.update({self.current_epoch: {k: v.clone() for k, v in self.backbone.state_dict().items()}}), raising=False
    )
    overrides = [*STAGE, "model.ssl_layers=2", "model.depth_router.per_token=true", "schedule=layerwise", "trainer.max_epochs=3",
                 "patches=sequential", "patches.num_patches=9", "data.train_subset=128", "data.batch_size=64", "trainer.log_every_n_steps=1",
                 "trainer.knn_every_n_epochs=0"]  # fmt: skip
    run = run_pretrain(pretrain_cfg(overrides), tmp_path / "pre")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["depth/params_pool"] > 0 and "depth/identity_share" in metrics
    assert sum(v for k, v in metrics.items() if k.startswith("depth/order/s0/")) == pytest.approx(1.0)
    final = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    pool = [k for k in final if k.startswith("backbone.blocks.2.")]  # the pool: blocks 0-1 are the first ssl stage
    assert pool and all(torch.equal(final[k], snapshots[1][k[len("backbone.") :]]) for k in pool)  # frozen after its stage
    assert not all(torch.equal(final[k], snapshots[0][k[len("backbone.") :]]) for k in pool)  # ... and it learned in it
    rows = (run / "logs" / "metrics.csv").read_text().splitlines()
    assert "loss/ponder" in rows[0] and "depth/identity_share" in rows[0]
    out = run_finetune(finetune_cfg([f"checkpoint={run}", "trainer.max_epochs=1", "data.train_subset=128"]), tmp_path / "ft", overrides=[])
    assert "depth/blocks_per_image" in json.loads((out / "metrics.json").read_text())


def test_tools_that_need_transformer_blocks_refuse_a_depth_stage_in_one_sentence(tmp_path):
    from ssroute.export.timm_vit import check_timm_compatible
    from ssroute.prune.run import run_prune
    from ssroute.upcycle.run import upcycle_checkpoint
    from tests.conftest import compose_config, write_checkpoint

    run = write_checkpoint(tmp_path / "run", [*STAGE, "model.stem=patch", "model.position=absolute"])
    config = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["hyper_parameters"]["config"]
    with pytest.raises(ConfigError, match=r"routes block \[1\] over depth"):
        check_timm_compatible(torch.nn.Identity(), config, str(run))
    with pytest.raises(ConfigError, match=r"has a pool routed over depth \(model.depth_layers=\[1\]\)"):
        run_prune(compose_config("prune", [f"checkpoint={run}"]), tmp_path / "prune", [])
    with pytest.raises(ConfigError, match=r"layers=\[1\] are not dense FFN blocks .* blocks routed over depth \[1\]"):
        upcycle_checkpoint(str(run), num_experts=2, layers=[1])
