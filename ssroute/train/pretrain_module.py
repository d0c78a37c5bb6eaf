"""Self-supervised pretraining as a LightningModule.

One step: uint8 images -> ``num_views`` augmented views (kornia, on the device)
-> backbone features -> SSL objective loss (+ auxiliary router losses). Each
epoch (and at the end) frozen features of the labelled train and test images are
gathered across ranks for kNN accuracy; the final evaluation adds a linear probe.

Reproducibility comes from :class:`ssroute.train.base.ResumableModule`: a run
resumed from any checkpoint continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ssroute.data import DataBundle
from ssroute.data.loader import ResumableLoader
from ssroute.data.views import ViewAugment
from ssroute.errors import ConfigError
from ssroute.eval.cka import linear_cka
from ssroute.eval.features import eval_loader, gather_unique
from ssroute.eval.knn import knn_accuracy
from ssroute.eval.linear import linear_probe_accuracy
from ssroute.eval.routing_stability import RoutingStabilityMeter
from ssroute.layers.moe import MoELayer, record_routing
from ssroute.models import build_backbone, extra_metrics
from ssroute.objectives import build_objective
from ssroute.patches import record_patches, selection_aux_loss
from ssroute.train.base import ResumableModule
from ssroute.train.optim import build_optimizer
from ssroute.train.routing import consistency_loss, consistent_layers, measure_stability, view_matches
from ssroute.train.schedule import SchedulePlan, StageEncoder, freeze_stages, stage_ranges
from ssroute.train.superclass import superclass_callbacks

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stops and the last good checkpoint is kept."""


class PretrainModule(ResumableModule):
    """Backbone + SSL objective + view augmentation, trained without labels.

    Args:
        cfg: the resolved pretraining config (``configs/pretrain.yaml``).
        data: the dataset bundle (image size, channels and statistics come from it).
    """

    def __init__(self, cfg: DictConfig, data: DataBundle) -> None:
        super().__init__()
        self.cfg, self.data = cfg, data
        self.save_hyperparameters({"config": OmegaConf.to_container(cfg, resolve=True)})
        self.backbone = build_backbone(cfg, data.image_size, data.channels)
        self.stages = stage_ranges(cfg.model)
        self.plan = SchedulePlan(cfg.schedule.name, len(self.stages), cfg.schedule.epochs_per_block or cfg.trainer.max_epochs, cfg.schedule.joint_epochs)
        if self.plan.name == "end_to_end":
            self.objective = build_objective(cfg.ssl.name, self.backbone, self.backbone.dim, cfg.ssl)
            self._encoders: list[torch.nn.Module] = [self.backbone]
        else:  # one local SSL head per stage; stage encoders share the backbone (kept out of the state dict)
            self._encoders = [StageEncoder(self.backbone, self.stages, stage) for stage in range(len(self.stages))]
            self.stage_objectives = torch.nn.ModuleList(build_objective(cfg.ssl.name, e, self.backbone.dim, cfg.ssl) for e in self._encoders)
        self._phase: int | str | None = None
        self.augment = ViewAugment(cfg.data.augment, data.channels, data.image_size, data.mean, data.std)
        self.final_metrics: dict[str, float] = {}
        self.final_eval = False
        self._eval_outputs: dict[int, list[tuple[torch.Tensor, ...]]] = {}
        self.moe_layers = self.find_moe_layers(self.backbone)
        self.consistent = consistent_layers(self.backbone) if self.moe_layers and cfg.consistency.weight > 0 else []
        self._stability = RoutingStabilityMeter(cfg.model.num_experts)
        self.k_schedule = build_schedule(cfg.k_schedule, self.backbone)
        self._block_features: list[list[torch.Tensor]] = []

    # -- data -------------------------------------------------------------------------------
    def train_dataloader(self) -> ResumableLoader:
        return ResumableLoader(
            self.data.train,
            batch_size=self.cfg.data.batch_size,
            seed=self.cfg.seed,
            rank=self.global_rank,
            world_size=self.trainer.world_size,
            num_workers=self.cfg.data.num_workers,
        )

    def val_dataloader(self) -> list:
        if not self.data.labeled:
            return []
        return [
            eval_loader(split, self.cfg.eval_batch_size, self.global_rank, self.trainer.world_size, self.cfg.data.num_workers)
            for split in (self.data.probe_train, self.data.test)
        ]

    # -- training ---------------------------------------------------------------------------
    def configure_callbacks(self) -> list:
        # super-class routing without labels (superclass.weight > 0): per-epoch image clusters as image-router targets
        return superclass_callbacks(self.cfg, self.backbone)

    def current(self) -> tuple[int | str, torch.nn.Module, torch.nn.Module]:
        """(phase, encoder, objective) of the current epoch."""
        if self.plan.name == "end_to_end":
            return "joint", self.backbone, self.objective
        phase = self.plan.phase(self.current_epoch)
        stage = len(self.stages) - 1 if phase == "joint" else phase
        encoder = self._encoders[stage]
        encoder.first = 0 if phase == "joint" else phase
        return phase, encoder, self.stage_objectives[stage]

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        phase, encoder, _ = self.current()
        if self.plan.name != "end_to_end":
            # every batch: Lightning puts the whole model back in train mode after validation
            freeze_stages(self.backbone, self.stages, encoder.first)
            self.log("stage", float(-1 if phase == "joint" else phase), prog_bar=True)
        if phase != self._phase:
            log.info("schedule %s: %s", self.plan.name, "all stages jointly" if phase == "joint" else f"stage {phase} of {len(self.stages)} on frozen stages below")
            self._phase = phase
        if self.k_schedule is not None:
            k = self.k_schedule(self.global_step)  # a pure function of the step: resumes keep it
            for layer in self.moe_layers:
                layer.set_k(k)
            self.log("k", float(k), prog_bar=True)

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        images = batch[0]
        _, encoder, objective = self.current()
        views = self.augment(images, num_views=objective.num_views)
        with record_routing(self.backbone) as recorded, record_patches(self.backbone) as patches:
            ssl_loss = objective(encoder, views.images)
        aux = self.moe_aux_loss()
        loss = ssl_loss if aux is None else ssl_loss + aux
        ponder = selection_aux_loss(patches)  # sequential patch selection's ponder cost (None otherwise)
        if ponder is not None:
            loss = loss + ponder
            self.log("ponder_cost", ponder)
        if self.consistent:
            matches = view_matches(self.backbone.patch_embed, views.matrices[0], views.matrices[1], patches)
            first_trainable = self.stages[getattr(encoder, "first", 0)][0]
            trainable = [name for name in self.consistent if int(name.split(".")[1]) >= first_trainable]
            consistency = consistency_loss(recorded, trainable, matches, images.shape[0], self.cfg.consistency)
            if consistency is not None:
                loss = loss + self.cfg.consistency.weight * consistency
                self.log("routing_consistency", consistency, prog_bar=True)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"the loss became {loss.item()} at step {self.global_step}; lower optim.lr or check the data. "
                "The last good checkpoint is kept in checkpoints/last.ckpt."
            )
        self.log("loss", ssl_loss, prog_bar=True)
        if aux is not None:
            self.log("aux_loss", aux)
            self.log_routing(self.backbone)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        self.log_dict(extra_metrics(self.backbone, training=True))  # backbone hook: depth/* of model=vit_depth ({} otherwise)
        return loss

    def after_optimizer_step(self) -> None:
        _, encoder, objective = self.current()
        if hasattr(objective, "epoch"):
            objective.epoch = self.current_epoch
        objective.on_step_end(encoder, self.progress)

    def configure_optimizers(self):
        steps = len(self.data.train) // self.trainer.world_size // self.cfg.data.batch_size
        limit = self.cfg.trainer.limit_train_batches
        if isinstance(limit, int):
            steps = min(steps, limit)
        elif isinstance(limit, float):
            steps = max(1, int(steps * limit))
        phases = None if self.plan.name == "end_to_end" else self.plan.phase_bounds
        return build_optimizer(self, self.cfg.optim, steps, self.cfg.trainer.max_epochs, phase_bounds=phases)

    # -- evaluation -------------------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen features ``[batch, dim]`` of uint8 images."""
        return self.backbone(self.augment.normalize(images))

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int, dataloader_idx: int = 0) -> None:
        images, labels, index = batch
        self._eval_outputs.setdefault(dataloader_idx, []).append((self.embed(images).float(), labels, index))
        if self.final_eval and dataloader_idx == 1:
            # mean-pooled output of every block, for CKA between consecutive blocks
            self._block_features.append([out.mean(dim=1).float() for out in self.backbone.block_outputs(self.augment.normalize(images))])
        if self.moe_layers and dataloader_idx == 1:
            # routing stability on the held-out images under the training augmentations, fixed pairs per batch
            torch.manual_seed(self.cfg.seed * 7_368_787 + batch_idx * 31 + self.global_rank)
            views = self.augment(images, num_views=2)
            with record_routing(self.backbone) as recorded, record_patches(self.backbone) as patches:
                for view in views.images:
                    self.backbone(view)
            matches = view_matches(self.backbone.patch_embed, views.matrices[0], views.matrices[1], patches)
            measure_stability(self._stability, recorded, matches, images.shape[0])

    def on_validation_epoch_end(self) -> None:
        if self._stability.counts:
            self._stability.reduce(lambda t: self.trainer.strategy.reduce(t, reduce_op="sum"))
            stats = self._stability.compute()
            self._stability = RoutingStabilityMeter(self.cfg.model.num_experts)
            for key, value in stats.items():
                self.log(key, value, prog_bar=key in ("routing_agreement", "routing_agreement_chance"), rank_zero_only=True)
            if self.final_eval:
                self.final_metrics.update(stats)
        if self._block_features:
            per_block = [torch.cat(parts) for parts in zip(*self._block_features, strict=True)]
            self._block_features.clear()
            for i in range(len(per_block) - 1):  # this rank's share of the test set: CKA is a statistic, no gather needed
                self.final_metrics[f"cka/block{i}_block{i + 1}"] = linear_cka(per_block[i], per_block[i + 1])
        if len(self._eval_outputs) < 2:
            self._eval_outputs.clear()
            return
        splits = []
        for idx in (0, 1):
            feats, labels, index = (torch.cat(parts) for parts in zip(*self._eval_outputs[idx], strict=True))
            splits.append(gather_unique(self.all_gather, feats, labels, index=index, world_size=self.trainer.world_size))
        self._eval_outputs.clear()
        (train_x, train_y), (test_x, test_y) = splits
        knn = knn_accuracy(train_x, train_y, test_x, test_y)
        self.log("knn_top1", knn, prog_bar=True, rank_zero_only=True)
        if self.final_eval:
            self.final_metrics["knn_top1"] = knn
            if self.global_rank == 0:
                self.final_metrics["linear_top1"] = linear_probe_accuracy(train_x, train_y, test_x, test_y, seed=self.cfg.seed)


def build_schedule(cfg: DictConfig, backbone: torch.nn.Module):
    """The k schedule of ``cfg`` (None when k is fixed), checked against every MoE layer before training."""
    if not cfg:
        return None
    from ssroute.routing.k_schedule import build_k_schedule

    options = dict(cfg)
    name = options.pop("name", None)
    if name is None:
        raise ConfigError("k_schedule needs a name: constant, linear or random (for example k_schedule={name: linear, start: 4, end: 1, steps: 1000}).")
    schedule = build_k_schedule(name, **options)
    layers = [m for m in backbone.modules() if isinstance(m, MoELayer)]
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
    if data.image_size % cfg.model.patch_size:
        divisors = [p for p in range(1, data.image_size + 1) if data.image_size % p == 0]
        raise ConfigError(
            f"model.patch_size={cfg.model.patch_size} does not divide the {cfg.data.name} image size {data.image_size}; choose one of {divisors}."
        )
    if cfg.model.dim % cfg.model.heads:
        raise ConfigError(f"model.dim={cfg.model.dim} is not divisible by model.heads={cfg.model.heads}; pick a dim that is a multiple of heads.")
    per_device = len(data.train) // max(1, _world_size(cfg))
    if per_device < cfg.data.batch_size:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} is larger than the {per_device} training images per device; lower data.batch_size."
        )


def _world_size(cfg: DictConfig) -> int:
    devices = cfg.trainer.devices
    return (devices if isinstance(devices, int) else 1) * cfg.trainer.num_nodes


def throughput(module: PretrainModule) -> dict[str, float]:
    time_s = module.train_time_s
    return {
        "train_time_s": round(time_s, 2),
        "images_per_s": round(module.images_seen / time_s, 1) if time_s > 0 else math.nan,
    }
