"""Self-supervised pretraining as a LightningModule.

One step, top to bottom (:meth:`PretrainModule.training_step`): uint8 images ->
``num_views`` augmented views (kornia, on the device) -> the encoder of the
current phase, once per view, giving ``(features, ForwardAux)`` -> a named dict
of losses — the SSL objective's, the auxiliary losses the forward returned
(router balance, ponder costs), the routing consistency between the views'
routings over corresponding patches, and super-class targets for image routers
— whose sum is the loss and whose entries are logged by name. Measuring (the
online monitor, routing fluctuation) lives in callbacks (``ssroute.train.callbacks``);
the final evaluation runs after the fit (``ssroute.train.run.finish_run``).

Reproducibility comes from :class:`ssroute.train.base.ResumableModule`: a run
resumed from any checkpoint continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from ssroute.checkpoint import ModelInputs
from ssroute.data import DataBundle
from ssroute.data.correspondence import matches_of
from ssroute.data.loader import ResumableLoader, loader_workers
from ssroute.data.shard_loader import ShardLoader
from ssroute.data.views import ViewAugment
from ssroute.errors import ConfigError
from ssroute.models import build_backbone
from ssroute.moe import moe_layers
from ssroute.objectives import build_objective
from ssroute.objectives.base import MomentumTeacher
from ssroute.objectives.dense import DensePatchLoss
from ssroute.objectives.routing_consistency import consistency_over_blocks
from ssroute.train.base import NonFiniteLossError, ResumableModule
from ssroute.train.optim import build_optimizer
from ssroute.train.schedule import SchedulePlan, StageEncoder, freeze_stages, stage_ranges
from ssroute.train.superclass_targets import SuperclassTargets

log = logging.getLogger(__name__)


@dataclass
class Phase:
    """What trains in the current epoch."""

    name: int | str  # the stage index, or "joint" when every stage trains
    encoder: Any  # images -> (features, aux): the backbone, or a StageEncoder over it
    objective: nn.Module  # the SSL objective (with its heads) of this phase
    dense: nn.Module | None  # the phase's patch-level loss (None = off)
    teacher: nn.Module | None  # the phase's routing teacher (None = targets from the student's own routings)
    first_block: int  # the first block that trains (routings of earlier blocks are frozen)
    end_block: int  # one past the last block that runs


class PretrainModule(ResumableModule):
    """Backbone + SSL objective(s) + view augmentation, trained without labels.

    Args:
        cfg: the resolved pretraining config (``configs/pretrain.yaml``).
        data: the dataset bundle (image size, channels and statistics come from it).
    """

    def __init__(self, cfg: DictConfig, data: DataBundle) -> None:
        super().__init__()
        self.cfg, self.data = cfg, data
        self.save_hyperparameters({"config": OmegaConf.to_container(cfg, resolve=True), "inputs": ModelInputs.of_data(data).as_dict()})
        self.backbone = build_backbone(cfg, data.image_size, data.channels)
        self.stages = stage_ranges(cfg.model)
        self.plan = SchedulePlan(
            cfg.schedule.name, len(self.stages), cfg.schedule.epochs_per_block or cfg.trainer.max_epochs, cfg.schedule.joint_epochs
        )
        if self.plan.name == "end_to_end":
            self.encoders: list[Any] = [self.backbone]
        else:  # one local SSL head per stage, each on the frozen output of the stages below
            self.encoders = [StageEncoder(self.backbone, start, end) for start, end in self.stages]
            if self.plan.name == "layerwise_then_joint":  # then every stage, through a head that starts as the last stage's
                self.encoders.append(StageEncoder(self.backbone, 0, self.stages[-1][1]))
        self.objectives = nn.ModuleList(build_objective(cfg.ssl.name, e, self.backbone.dim, cfg.ssl) for e in self.encoders)
        dense = cfg.get("dense")
        self.dense = None  # patch-level SSL per phase, on the phase's output tokens of corresponding patches
        if dense is not None and dense.weight > 0:
            self.dense = nn.ModuleList(
                DensePatchLoss(
                    self.backbone.dim,
                    dense.proj_hidden,
                    dense.proj_dim,
                    dense.loss,
                    dense.max_pairs,
                    cfg.ssl.temperature,
                    dense.partners == "soft",
                )
                for _ in self.encoders
            )
        self.augment = ViewAugment(cfg.data.augment, data.channels, data.image_size, data.mean, data.std)
        self.routing_teachers = None  # EMA copies of each phase's trainable segment whose routings give the consistency targets
        if cfg.consistency.weight > 0 and cfg.consistency.get("teacher_momentum", 0.0) > 0:
            self.routing_teachers = nn.ModuleList(MomentumTeacher(e, None, None, cfg.consistency.teacher_momentum) for e in self.encoders)
        layers = moe_layers(self.backbone)
        self.consistent_blocks = [i for i, m in layers.items() if m.router.learned] if cfg.consistency.weight > 0 else []
        skipped = sorted(set(layers) - set(self.consistent_blocks))
        if cfg.consistency.weight > 0 and skipped:
            log.info("routing consistency skips block(s) %s: their routers have no learned distribution", skipped)
        self.k_schedule = build_schedule(cfg.k_schedule, self.backbone)
        self.superclass = SuperclassTargets.for_pretraining(cfg, self.backbone, len(data.train))
        self.steps_per_epoch = 1
        self._phase: int | str | None = None

    # -- data -------------------------------------------------------------------------------
    def train_dataloader(self) -> ResumableLoader | ShardLoader:
        if self.data.stream is not None:  # data=webdataset: batches streamed from tar shards
            return ShardLoader(
                self.data.stream,
                batch_size=self.cfg.data.batch_size,
                seed=self.cfg.seed,
                rank=self.global_rank,
                world_size=self.trainer.world_size,
                num_workers=loader_workers(self.cfg.data.num_workers, self.data.stream),
            )
        return ResumableLoader(
            self.data.train,
            batch_size=self.cfg.data.batch_size,
            seed=self.cfg.seed,
            rank=self.global_rank,
            world_size=self.trainer.world_size,
            num_workers=loader_workers(self.cfg.data.num_workers, self.data.train),
        )

    # -- the schedule -----------------------------------------------------------------------
    def phase(self) -> Phase:
        """The encoder, objective and first trainable block of the current epoch."""
        name = self.plan.phase(self.current_epoch)
        index = 0 if self.plan.name == "end_to_end" else len(self.stages) if name == "joint" else name
        dense = None if self.dense is None else self.dense[index]
        teacher = None if self.routing_teachers is None else self.routing_teachers[index]
        if self.plan.name == "end_to_end":
            return Phase(name, self.backbone, self.objectives[0], dense, teacher, 0, self.backbone.depth)
        encoder = self.encoders[index]
        return Phase(name, encoder, self.objectives[index], dense, teacher, encoder.start, encoder.end)

    def phase_progress(self) -> float:
        """Share of the current phase done, 0 -> 1 (momentum teachers ramp within their own phase)."""
        start, epochs = self.plan.phase_bounds(self.current_epoch)
        return (self.global_step - start * self.steps_per_epoch) / max(1, epochs * self.steps_per_epoch)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        phase = self.phase()
        if self.plan.name != "end_to_end":
            # every batch: Lightning puts the whole model back in train mode after a callback's evaluation
            first = 0 if phase.name == "joint" else phase.name
            freeze_stages(self.backbone, self.stages, first, len(self.stages) - 1 if phase.name == "joint" else phase.name)
            self.log("stage", float(-1 if phase.name == "joint" else phase.name), prog_bar=True)
        start_epoch, _ = self.plan.phase_bounds(self.current_epoch)
        if self.global_step == start_epoch * self.steps_per_epoch:  # the phase's first step (also after a resume: a step, not an event)
            if self.plan.name == "layerwise_then_joint" and phase.name == "joint":
                heads = {k: v for k, v in self.objectives[len(self.stages) - 1].state_dict().items() if not k.startswith("teacher.")}
                phase.objective.load_state_dict(heads, strict=False)  # the last stage's heads carry on; a teacher syncs below
            phase.objective.start_phase(phase.encoder)
            if phase.teacher is not None:
                phase.teacher.sync(phase.encoder)
        if phase.name != self._phase:
            log.info(
                "schedule %s: %s",
                self.plan.name,
                "all stages jointly" if phase.name == "joint" else f"stage {phase.name} of {len(self.stages)} on frozen stages below",
            )
            self._phase = phase.name
        if self.k_schedule is not None:
            k = self.k_schedule(self.global_step)  # a pure function of the step: resumes keep it
            for layer in moe_layers(self.backbone).values():
                layer.set_k(k)
            self.log("k", float(k), prog_bar=True)

    def on_train_epoch_start(self) -> None:
        if self.superclass is not None:  # super-class routing without labels: this epoch's image clusters
            phase = self.phase()
            self.superclass.refresh_clusters(self, range(phase.first_block, phase.end_block))

    # -- one step ---------------------------------------------------------------------------
    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        images, _, index = batch
        phase = self.phase()
        views = self.augment(images, num_views=phase.objective.num_views)
        outputs = [phase.encoder(view) for view in views.images]  # (features [B, D], ForwardAux) per view
        features, auxes = [f for f, _ in outputs], [a for _, a in outputs]
        losses = {"ssl": phase.objective(features, views.images, phase.encoder)}
        losses.update(mean_over_views([aux.losses for aux in auxes]))  # router balance, ponder costs
        losses.update(self.correspondence_losses(phase, views, auxes))  # dense SSL and routing consistency
        if self.superclass is not None:
            losses.update(self.superclass.losses(self, auxes, index, phase.first_block))
        loss = torch.stack(list(losses.values())).sum()
        self.log_step(loss, losses, auxes[0])
        return loss

    def correspondence_losses(self, phase: Phase, views, auxes: list) -> dict[str, Tensor]:
        """The losses over corresponding patches of views 1 and 2: patch-level SSL on the phase's output tokens
        (``dense``) and routing consistency of the trainable routed blocks (``consistency``)."""
        blocks = [b for b in self.consistent_blocks if b >= phase.first_block]
        if not blocks and phase.dense is None:
            return {}
        matches = matches_of(views, [a.patches for a in auxes], self.backbone.patch_embed)
        losses = {}
        if phase.dense is not None:
            losses["dense"] = self.cfg.dense.weight * phase.dense(auxes[0].tokens, auxes[1].tokens, matches[0])
        targets = None
        if blocks and phase.teacher is not None:  # DINO-style: the EMA teacher's routing of each view is the other view's target
            with torch.no_grad():
                targets = tuple(phase.encoder(view, segment=phase.teacher.encoder)[1].routings for view in views.images[:2])
        consistency = consistency_over_blocks((auxes[0].routings, auxes[1].routings), matches, blocks, self.cfg.consistency, targets)
        if consistency is not None:
            losses["consistency"] = self.cfg.consistency.weight * consistency
        return losses

    def log_step(self, loss: Tensor, losses: dict[str, Tensor], aux) -> None:
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"the loss became {loss.item()} at step {self.global_step}; lower optim.lr or check the data. "
                "The last good checkpoint is kept in checkpoints/last.ckpt."
            )
        self.log("loss", loss, prog_bar=True)
        self.log_dict({f"loss/{name}": value for name, value in losses.items()}, prog_bar=False)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        self.log_routing(aux)

    def after_optimizer_step(self) -> None:
        phase = self.phase()
        if hasattr(phase.objective, "epoch"):
            phase.objective.epoch = self.current_epoch - self.plan.phase_bounds(self.current_epoch)[0]
        phase.objective.on_step_end(phase.encoder, self.phase_progress())
        if phase.teacher is not None:
            phase.teacher.update(phase.encoder, None, self.phase_progress())

    def configure_optimizers(self):
        steps = self.data.train_count // self.trainer.world_size // self.cfg.data.batch_size
        limit = self.cfg.trainer.limit_train_batches
        if isinstance(limit, int):
            steps = min(steps, limit)
        elif isinstance(limit, float):
            steps = max(1, int(steps * limit))
        self.steps_per_epoch = max(1, steps)
        phases = None if self.plan.name == "end_to_end" else self.plan.phase_bounds
        return build_optimizer(self, self.cfg.optim, steps, self.cfg.trainer.max_epochs, phase_bounds=phases)

    def embed(self, images: Tensor) -> Tensor:
        """Frozen features ``[batch, dim]`` of uint8 images."""
        return self.backbone(self.augment.normalize(images))[0]


def mean_over_views(per_view: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Each named auxiliary loss averaged over the views whose forward produced it."""
    names = dict.fromkeys(name for losses in per_view for name in losses)
    return {name: torch.stack([losses[name] for losses in per_view if name in losses]).mean() for name in names}


def build_schedule(cfg: DictConfig, backbone: nn.Module):
    """The k schedule of ``cfg`` (None when k is fixed), checked against every MoE layer before training."""
    if not cfg:
        return None
    from ssroute.routing.k_schedule import build_k_schedule

    options = dict(cfg)
    name = options.pop("name", None)
    if name is None:
        raise ConfigError(
            "k_schedule needs a name: constant, linear or random (for example k_schedule={name: linear, start: 4, end: 1, steps: 1000})."
        )
    schedule = build_k_schedule(name, **options)
    layers = moe_layers(backbone).values()
    if not layers:
        raise ConfigError("k_schedule is set but the model has no MoE layer; set model.moe_layers or drop k_schedule.")
    bounds = {int(v) for k, v in options.items() if k in ("k", "start", "end", "low", "high")}
    for layer in layers:
        for k in sorted(bounds):  # the smallest and the largest k the schedule reaches must fit every router
            layer.set_k(k)  # raises the router's own sentence when k does not fit it
        layer.set_k(schedule(0))
    return schedule


def check_pretrain_config(cfg: DictConfig, data: DataBundle) -> None:
    """Cross-checks between the config and the data, before any compute."""
    from ssroute.layers.patch_embed import check_patch_size

    check_patch_size(cfg.model.patch_size, data.image_size, data=cfg.data.name)
    if cfg.model.dim % cfg.model.heads:
        raise ConfigError(
            f"model.dim={cfg.model.dim} is not divisible by model.heads={cfg.model.heads}; pick a dim that is a multiple of heads."
        )
    if data.stream is not None and (cfg.get("superclass") or {}).get("weight", 0) > 0:
        raise ConfigError(
            "superclass routing clusters every training image each epoch, which streamed shards (data=webdataset) do not allow; set superclass.weight=0."
        )
    per_device = data.train_count // max(1, _world_size(cfg))
    if per_device < cfg.data.batch_size:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} is larger than the {per_device} training images per device; lower data.batch_size."
        )


def _world_size(cfg: DictConfig) -> int:
    devices = cfg.trainer.devices
    return (devices if isinstance(devices, int) else 1) * cfg.trainer.num_nodes


def throughput(module: ResumableModule) -> dict[str, float]:
    time_s = module.train_time_s
    return {
        "train_time_s": round(time_s, 2),
        "images_per_s": round(module.images_seen / time_s, 1) if time_s > 0 else math.nan,
    }
