"""Momentum teachers in layerwise stacks: they share the frozen prefix, own only the trainable stage, and never train."""

import pytest
import torch
from omegaconf import OmegaConf

from ssroute.config import PretrainConfig, SSLConfig
from ssroute.models import build_backbone
from ssroute.objectives import build_objective
from ssroute.train.schedule import StageEncoder, freeze_stages, resolve_stack, stage_ranges


def stack_backbone():
    cfg = OmegaConf.structured(PretrainConfig())
    cfg.model.update({"dim": 16, "heads": 2, "patch_size": 2, "stack": ["ssl", "route", "ssl"], "ssl_layers": 1, "num_experts": 4})
    cfg.schedule.name = "layerwise"
    cfg.trainer.max_epochs = 3
    resolve_stack(cfg)
    torch.manual_seed(0)
    return build_backbone(cfg, image_size=8, channels=1), stage_ranges(cfg.model)


@pytest.mark.parametrize("ssl", ["byol", "dino"])
def test_a_layerwise_teacher_sees_bit_identical_frozen_prefix_outputs_and_owns_only_its_stage(ssl):
    backbone, stages = stack_backbone()
    start, end = stages[2]  # the last stage trains on the frozen blocks 0 and 1
    encoder = StageEncoder(backbone, start, end)
    options = {"prototypes": 32} if ssl == "dino" else {}
    objective = build_objective(ssl, encoder, 16, OmegaConf.structured(SSLConfig(name=ssl, proj_hidden=32, proj_dim=16, options=options)))
    freeze_stages(backbone, stages, 2)
    # the teacher holds copies of block 2 and the final norm only: no patch embedding, no frozen block
    copied = {name for name, _ in objective.teacher.encoder.named_parameters()}
    assert copied and all(name.startswith(("blocks.0.", "norm.")) for name in copied)
    assert sum(p.numel() for p in objective.teacher.encoder.parameters()) == sum(p.numel() for p in encoder.segment().parameters())
    seen = []
    backbone.blocks[start - 1].register_forward_hook(lambda module, args, out: seen.append(out[0].detach().clone()))
    view = torch.randn(4, 1, 8, 8)
    encoder(view)
    objective.teacher(view, encoder)
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])
    # a change in the frozen prefix reaches the teacher at once: it is shared, not a copy taken at construction
    before = objective.teacher(view, encoder)
    with torch.no_grad():
        backbone.blocks[0].attn.proj.weight.add_(0.5 * torch.randn_like(backbone.blocks[0].attn.proj.weight))
    assert not torch.allclose(objective.teacher(view, encoder), before)


def test_the_teacher_stays_in_eval_mode_and_follows_buffers():
    backbone, stages = stack_backbone()
    encoder = StageEncoder(backbone, *stages[1])  # the routed stage
    objective = build_objective("byol", encoder, 16, OmegaConf.structured(SSLConfig(name="byol", proj_hidden=32, proj_dim=16)))
    objective.train()
    assert not objective.teacher.training and not any(m.training for m in objective.teacher.modules())
    assert not any(p.requires_grad for p in objective.teacher.parameters())
    objective.on_step_end(encoder, progress=0.0)  # EMA of parameters, copy of buffers
    student_buffers = dict(encoder.segment().named_buffers())
    for name, buffer in objective.teacher.encoder.named_buffers():
        assert torch.equal(buffer, student_buffers[name])


def test_a_teacher_synced_at_its_phase_start_equals_the_student():
    backbone, stages = stack_backbone()
    encoder = StageEncoder(backbone, 0, stages[-1][1])  # the joint phase of layerwise_then_joint
    objective = build_objective("byol", encoder, 16, OmegaConf.structured(SSLConfig(name="byol", proj_hidden=32, proj_dim=16)))
    with torch.no_grad():
        backbone.blocks[1].attn.proj.weight.add_(torch.randn_like(backbone.blocks[1].attn.proj.weight))  # the stages trained before the phase began
    objective.start_phase(encoder)
    for mine, theirs in zip(objective.teacher.encoder.parameters(), encoder.segment().parameters(), strict=True):
        assert torch.equal(mine, theirs)


def test_a_routing_teacher_is_an_ema_of_the_routed_stage_and_never_gets_gradients():
    from ssroute.objectives.base import MomentumTeacher

    backbone, stages = stack_backbone()
    encoder = StageEncoder(backbone, *stages[1])  # the routed stage
    freeze_stages(backbone, stages, 1)
    teacher = MomentumTeacher(encoder, None, None, momentum=0.9)
    assert not any(p.requires_grad for p in teacher.parameters())
    before = {name: p.clone() for name, p in teacher.encoder.named_parameters()}
    with torch.no_grad():
        for p in encoder.segment().parameters():
            p.add_(1.0)  # the student moves
    teacher.update(encoder, None, progress=0.0)  # momentum 0.9 at the start of the phase
    student = dict(encoder.segment().named_parameters())
    for name, p in teacher.encoder.named_parameters():
        assert torch.allclose(p, 0.9 * before[name] + 0.1 * student[name], atol=1e-6)
    view = torch.randn(4, 1, 8, 8, requires_grad=True)
    _, aux = encoder(view, segment=teacher.encoder)  # the teacher's routing of a view, on the student's frozen prefix
    assert set(aux.routings) == {stages[1][0]}
    assert not aux.routings[stages[1][0]].probs.requires_grad  # no gradient can reach the teacher
    teacher.sync(encoder)
    for name, p in teacher.encoder.named_parameters():
        assert torch.equal(p, student[name])
