"""trainer.precision=bf16-mixed runs on CPU; trainer.compile=true compiles the dense parts and leaves MoE layers eager."""

import copy
import json

import pytest
import torch

from ssroute.layers.block import TransformerBlock
from ssroute.models.compile import compile_backbone
from ssroute.models.vit import ViT
from ssroute.moe import build_moe
from ssroute.train.pretrain import run_pretrain
from ssroute.train.pretrain_module import PretrainModule

ROUTED = ["model.moe_layers=[1]", "model.num_experts=4"]


@pytest.mark.slow
def test_bf16_mixed_trains_a_routed_model_on_cpu(tmp_path, pretrain_cfg, monkeypatch):
    seen = []
    step = PretrainModule.training_step

    def recording_step(self, batch, batch_idx):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return step(self, batch, batch_idx)

    monkeypatch.setattr(PretrainModule, "training_step", recording_step)
    run = run_pretrain(pretrain_cfg([*ROUTED, "trainer.precision=bf16-mixed", "trainer.max_epochs=1"]), tmp_path / "run")
    assert seen and all(enabled and dtype == torch.bfloat16 for enabled, dtype in seen)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["linear_top1"] > 0.5 and metrics["routing_agreement"] > metrics["routing_agreement_chance"]
    weights = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert all(
        v.dtype == torch.float32 for k, v in weights.items() if k.startswith("backbone.") and v.is_floating_point()
    )  # fp32 master weights


def routed_vit() -> ViT:
    torch.manual_seed(0)
    ffn = lambda layer: (
        build_moe(dim=16, hidden=32, num_experts=4, router="token_choice", experts="mlp", router_options={"k": 2}) if layer == 1 else None
    )  # noqa: E731
    vit = ViT(image_size=8, channels=1, dim=16, depth=2, heads=2, patch_size=2)
    vit.blocks[1] = TransformerBlock(16, 2, ffn(1))
    return vit


@pytest.mark.slow
def test_compiled_backbone_matches_eager_across_batch_sizes_and_data_dependent_loads(tmp_path):
    eager = routed_vit()
    compiled = copy.deepcopy(eager)
    names = compile_backbone(compiled)
    assert names == ["blocks.0", "blocks.1.norm1", "blocks.1.attn", "blocks.1.norm2"]
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # checkpoints and exports keep their names
    for batch in (4, 6, 3):  # new batch sizes, and new per-expert loads in the MoE layer every time
        images = torch.randn(batch, 1, 8, 8)
        torch.manual_seed(batch)  # the router's training noise draws the same numbers in both
        ours, aux = compiled(images)
        torch.manual_seed(batch)
        theirs, eager_aux = eager(images)
        assert torch.allclose(ours, theirs, atol=1e-5)
        assert torch.equal(aux.routings[1].expert, eager_aux.routings[1].expert)
        ours.square().sum().backward()
        theirs.square().sum().backward()
        for (name, a), b in zip(compiled.named_parameters(), eager.parameters(), strict=True):
            assert torch.allclose(a.grad, b.grad, atol=1e-4), name
            a.grad = b.grad = None


@pytest.mark.slow
def test_trainer_compile_compiles_the_backbone_of_the_run(tmp_path, pretrain_cfg, monkeypatch):
    import ssroute.train.pretrain as pretrain

    compiled = []
    monkeypatch.setattr(pretrain, "compile_backbone", lambda backbone: compiled.append(backbone) or ["blocks.0"])
    run_pretrain(pretrain_cfg([*ROUTED, "trainer.compile=true", "trainer.max_epochs=1"]), tmp_path / "run")
    assert len(compiled) == 1 and isinstance(compiled[0], ViT)
    run_pretrain(pretrain_cfg([*ROUTED, "trainer.max_epochs=1"]), tmp_path / "eager")
    assert len(compiled) == 1  # off by default
