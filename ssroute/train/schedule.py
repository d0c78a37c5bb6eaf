"""Training schedules over a stack of blocks: layerwise, end to end, or layerwise then joint.

A stack ``[ssl, route, ssl]`` is a list of *stages*; each stage is a run of
transformer blocks: ``ssl`` is ``model.ssl_layers`` dense blocks, ``route`` one
block whose FFN is an MoE layer, ``dense`` one dense block in the same place
(the equal-active-parameter baseline of a ``route`` block), and ``depth`` a pool
of blocks and identities that each image (or token) routes through over depth
(``model.depth_router``, ``ssroute.models.depth_router``), in one block's place. ``layerwise`` trains stage 1 on
images with its own SSL head, then stage 2 on the frozen outputs of stage 1,
and so on, ``epochs_per_block`` epochs each — the notes' "SS layers are trained
sequentially: first on images, then on the outputs of the first SS layer" (and
blockwise self-supervised training, Siddiqui et al. 2023). Frozen stages run in
eval mode without autograd. ``end_to_end`` trains all stages with one head at the
top; ``layerwise_then_joint`` adds ``joint_epochs`` of that after the layerwise
phases. The phase is a function of the epoch, so a resumed run is in the right one.

>>> plan = SchedulePlan("layerwise_then_joint", stages=3, epochs_per_block=2, joint_epochs=1)
>>> [plan.phase(e) for e in range(7)], plan.total_epochs
([0, 0, 1, 1, 2, 2, 'joint'], 7)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ssroute.errors import ConfigError

SCHEDULES = ("end_to_end", "layerwise", "layerwise_then_joint")
BLOCK_KINDS = ("ssl", "route", "dense", "depth")


@dataclass(frozen=True)
class SchedulePlan:
    """Which stage trains in which epoch."""

    name: str
    stages: int
    epochs_per_block: int
    joint_epochs: int = 0

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ConfigError(f"schedule.name={self.name!r} is unknown; choose one of: {', '.join(SCHEDULES)}.")

    @property
    def total_epochs(self) -> int:
        if self.name == "end_to_end":
            return self.epochs_per_block
        return self.stages * self.epochs_per_block + (self.joint_epochs if self.name == "layerwise_then_joint" else 0)

    def phase(self, epoch: int) -> int | str:
        """The stage index trained in ``epoch``, or ``"joint"`` when all stages train together."""
        if self.name == "end_to_end" or epoch >= self.stages * self.epochs_per_block:
            return "joint"
        return epoch // self.epochs_per_block

    def phase_bounds(self, epoch: int) -> tuple[int, int]:
        """First epoch and number of epochs of the phase containing ``epoch`` (for per-phase LR schedules)."""
        phase = self.phase(epoch)
        if phase == "joint":
            start = 0 if self.name == "end_to_end" else self.stages * self.epochs_per_block
            return start, self.total_epochs - start
        return phase * self.epochs_per_block, self.epochs_per_block


class StageEncoder:
    """Images -> ``(features, aux)`` through the blocks ``[0, end)``, the blocks below ``start`` frozen: a view of the backbone.

    Not a module: it owns no parameters (the backbone does), so it never
    duplicates weights in a checkpoint. :meth:`segment` names the modules that
    train, which a momentum teacher copies (``ssroute.objectives.base``).

    Args:
        backbone: the ViT whose blocks form the stages.
        start: the first block that trains.
        end: one past the last block that runs (the stage's end).
    """

    def __init__(self, backbone: nn.Module, start: int, end: int) -> None:
        self.backbone, self.start, self.end = backbone, start, end

    def __call__(self, images: torch.Tensor, segment: nn.Module | None = None):
        return self.backbone(images, end=self.end, frozen_below=self.start, segment=segment)

    def segment(self) -> nn.Module:
        return self.backbone.segment(self.start, self.end)


def stage_ranges(model) -> list[tuple[int, int]]:
    """``(start, end)`` block ranges of the stack's stages; without a stack, every block is a stage."""
    if not model.stack:
        return [(i, i + 1) for i in range(model.depth)]
    ranges, start = [], 0
    for kind in model.stack:
        size = model.ssl_layers if kind == "ssl" else 1
        ranges.append((start, start + size))
        start += size
    return ranges


def resolve_stack(cfg) -> None:
    """Turn ``model.stack`` into ``model.depth`` / ``model.moe_layers`` / ``model.depth_layers`` and the schedule into epochs, in place."""
    resolve_stack_model(cfg.model)
    stages = len(stage_ranges(cfg.model))
    total = cfg.trainer.max_epochs
    per_block = cfg.schedule.epochs_per_block or max(1, total // (stages if cfg.schedule.name != "end_to_end" else 1))
    plan = SchedulePlan(cfg.schedule.name, stages, per_block if cfg.schedule.name != "end_to_end" else total, cfg.schedule.joint_epochs)
    cfg.schedule.epochs_per_block = plan.epochs_per_block
    cfg.trainer.max_epochs = plan.total_epochs


def resolve_stack_model(model) -> None:
    """Turn ``model.stack`` into ``model.depth`` / ``model.moe_layers`` / ``model.depth_layers`` in place (a model
    trained from scratch has the same blocks as the stack pretraining builds)."""
    if model.stack:
        unknown = [kind for kind in model.stack if kind not in BLOCK_KINDS]
        if unknown:
            raise ConfigError(f"model.stack={list(model.stack)} has unknown block kinds {unknown}; use {', '.join(BLOCK_KINDS)}.")
        ranges = stage_ranges(model)
        of_kind = lambda wanted: [start for (start, _), kind in zip(ranges, model.stack, strict=True) if kind == wanted]  # noqa: E731
        routed, depth_routed = of_kind("route"), of_kind("depth")
        for key, blocks in (("moe_layers", routed), ("depth_layers", depth_routed)):
            if list(model.get(key) or []) not in ([], blocks):
                raise ConfigError(f"model.{key}={list(model[key])} contradicts model.stack={list(model.stack)}; set only model.stack.")
        model.depth, model.moe_layers = ranges[-1][1], routed
        if depth_routed or "depth_layers" in model:  # configs written before depth stages have no such key
            model.depth_layers = depth_routed


def freeze_stages(backbone: nn.Module, stages: list[tuple[int, int]], first_trainable: int, last_trainable: int | None = None) -> None:
    """Stages before ``first_trainable`` (and the patch embedding with them) stop learning and run in eval mode.

    The final LayerNorm belongs to the last stage: it learns only while that stage trains (earlier
    stages pool through a norm without parameters, ``ssroute.models.vit``).
    """
    frozen_blocks = stages[first_trainable][0]
    last = len(stages) - 1 if last_trainable is None else last_trainable
    backbone.patch_embed.requires_grad_(first_trainable == 0)
    backbone.patch_embed.train(first_trainable == 0)
    for index, block in enumerate(backbone.blocks):
        trainable = index >= frozen_blocks
        block.requires_grad_(trainable)
        block.train(trainable)
    backbone.norm.requires_grad_(last == len(stages) - 1)
