"""The pruning run's training step: masked student, frozen teacher, distillation and the Lagrangian.

One step (CoFI, Xia et al. 2022)::

    masks.draw()                                    # one hard-concrete sample per gate
    features, aux = student(view)                   # masked by the gates' hooks (ssroute.prune.masks)
    losses = task CE (labelled) + router aux losses
           + output_weight * output_loss(student logits or features, teacher's)
           + layer_weight * layer-matched hidden-state loss            (distill=layerwise)
           + attn_weight / ffn_weight * per-block sublayer losses      (distill=layerwise)
           + lagrangian(expected sparsity of P(z != 0), target at this step)

The teacher runs in eval mode without autograd and is not part of the
module's state (a resumed run rebuilds it from its checkpoint). The gates'
``log_alpha``, the Lagrange multipliers and the layer transform are, so a
resumed run continues with identical masks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from ssroute.data import DataBundle, ImageSet
from ssroute.data.loader import ResumableLoader, loader_workers
from ssroute.data.views import ViewAugment
from ssroute.prune.distill import layerwise_loss, output_loss, sublayer_losses
from ssroute.prune.lagrangian import LagrangianController
from ssroute.prune.masks import MaskSet, sort_expert_units
from ssroute.prune.sparsity import expected_sparsity
from ssroute.prune.taps import Taps
from ssroute.train.base import NonFiniteLossError, ResumableModule
from ssroute.train.optim import param_groups


def identity_linear(dim_in: int, dim_out: int) -> nn.Linear:
    """A linear map starting as the identity (padded or cut when the widths differ): the student starts as the teacher."""
    layer = nn.Linear(dim_in, dim_out)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(dim_out, dim_in))
        layer.bias.zero_()
    return layer


class Teacher:
    """The frozen teacher (backbone and, for labelled data, its head) with taps on its blocks; not a submodule."""

    def __init__(self, backbone: nn.Module, head: nn.Module | None) -> None:
        self.backbone, self.head = backbone.eval().requires_grad_(False), head
        if head is not None:
            head.eval().requires_grad_(False)
        self.taps = Taps(backbone)

    def to(self, device) -> Teacher:
        self.backbone.to(device)
        if self.head is not None:
            self.head.to(device)
        return self

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        features, _ = self.backbone(images)
        return features, None if self.head is None else self.head(features)


class PruneModule(ResumableModule):
    """Student backbone (+ head) under masks, trained against the target sparsity and the teacher.

    Args:
        cfg: the resolved prune config.
        data: the dataset bundle.
        train_set: the training images (labelled ones for a labelled source).
        student: the source backbone (the student starts as it).
        head: the source's classification head (labelled), or None.
        teacher: the frozen teacher, or None (``distill=none``).
    """

    def __init__(
        self, cfg: DictConfig, data: DataBundle, train_set: ImageSet, student: nn.Module, head: nn.Module | None, teacher: Teacher | None
    ) -> None:
        super().__init__()
        self.cfg, self.data, self.train_set = cfg, data, train_set
        self.backbone, self.head = student, head
        self.labelled = head is not None
        sort_expert_units(self.backbone)
        self.masks = None
        if cfg.target_sparsity > 0:
            structures = list(cfg.structures) if cfg.structures is not None else None
            self.masks = MaskSet(self.backbone, structures, cfg.l0_temperature, cfg.droprate_init)
            self.masks.attach(self.backbone, head[-1] if head is not None else None)
        self.controller = LagrangianController(cfg.target_sparsity)
        self._teacher = teacher
        self.augment = ViewAugment(cfg.data.augment, data.channels, data.image_size, data.mean, data.std)
        self.distill = cfg.distill if teacher is not None else "none"
        self.student_taps = Taps(self.backbone) if self.distill == "layerwise" else None
        if self.distill != "none":
            teacher_dim = teacher.backbone.dim
            self.layer_transform = identity_linear(self.backbone.dim, teacher_dim) if self.distill == "layerwise" else None
            self.feature_transform = identity_linear(self.backbone.dim, teacher_dim) if not self.labelled else None
        self.test_top1: float | None = None

    @property
    def teacher(self) -> Teacher | None:
        return self._teacher

    def on_fit_start(self) -> None:
        if self._teacher is not None:
            self._teacher.to(self.device)

    def train_dataloader(self) -> ResumableLoader:
        batch = min(self.cfg.data.batch_size, len(self.train_set))
        workers = loader_workers(self.cfg.data.num_workers, self.train_set)
        return ResumableLoader(self.train_set, batch, self.cfg.seed, self.global_rank, self.trainer.world_size, num_workers=workers)

    def steps_per_epoch(self) -> int:
        return max(1, len(self.train_set) // min(self.cfg.data.batch_size, len(self.train_set)))

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels, _ = batch
        view = self.augment.view(images)[0]
        if self.masks is not None:
            self.masks.train().draw()
        features, aux = self.backbone(view)
        losses = dict(aux.losses)  # router balance losses of the student's MoE layers
        logits = self.head(features) if self.labelled else None
        if self.labelled and self.cfg.task_weight > 0:
            losses["task"] = self.cfg.task_weight * F.cross_entropy(logits, labels)
        if self.distill != "none":
            losses.update(self.distillation(view, features, logits))
        if self.masks is not None:
            expected = expected_sparsity(self.masks.shape, self.masks.keep_probabilities())
            target = self.controller.target_at(self.global_step)
            losses["lagrangian"] = self.controller(expected, self.global_step)
            self.log_dict({"sparsity/expected": expected.detach(), "sparsity/target": target, "lambda_1": self.controller.lambda_1.detach(),
                           "lambda_2": self.controller.lambda_2.detach()})  # fmt: skip
        total = torch.stack(list(losses.values())).sum()
        if not torch.isfinite(total):
            raise NonFiniteLossError(f"the loss became {total.item()} at step {self.global_step}; lower optim.lr or reg_learning_rate.")
        self.log("loss", total, prog_bar=True)
        self.log_dict({f"loss/{name}": value.detach() for name, value in losses.items()})
        return total

    def distillation(self, view: torch.Tensor, features: torch.Tensor, logits: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The weighted distillation losses of this step against the teacher."""
        cfg = self.cfg
        t_features, t_logits = self._teacher(view)
        out = {}
        if cfg.output_weight > 0:
            if self.labelled:
                out["distill_output"] = cfg.output_weight * output_loss(logits, t_logits, cfg.output_loss, cfg.temperature)
            else:
                out["distill_output"] = cfg.output_weight * output_loss(
                    self.feature_transform(features), t_features, cfg.output_loss, cfg.temperature
                )
        if self.distill != "layerwise":
            return out
        student, teacher = self.student_taps, self._teacher.taps
        allowed = None
        if self.masks is not None and "mha" in self.masks.z:  # CoFI: only layers that keep their attention are matched
            allowed = self.masks.z["mha"].detach() != 0
        hidden = self._hidden_gate()
        matched, _ = layerwise_loss([self.layer_transform(h * hidden) for h in student.outputs], teacher.outputs, cfg.layer_loss, allowed)
        out["distill_layer"] = cfg.layer_weight * matched
        if len(student.outputs) == len(teacher.outputs):
            if cfg.attn_weight > 0:
                out["distill_attn"] = (
                    cfg.attn_weight * sublayer_losses([self.layer_transform(a) for a in student.attn], teacher.attn, cfg.layer_loss).sum()
                )
            if cfg.ffn_weight > 0:
                out["distill_ffn"] = (
                    cfg.ffn_weight * sublayer_losses([self.layer_transform(f) for f in student.ffn()], teacher.ffn(), cfg.layer_loss).sum()
                )
        return out

    def _hidden_gate(self) -> torch.Tensor | float:
        if self.masks is None or "hidden" not in self.masks.z:
            return 1.0
        return self.masks.z["hidden"]

    def configure_optimizers(self):
        """AdamW: model weights at ``optim.lr`` with warmup and cosine decay; the gates and the multipliers at
        ``reg_learning_rate``, constant, without weight decay (the multipliers ascend, see ``lagrangian``)."""
        cfg = self.cfg
        gate_params = [] if self.masks is None else list(self.masks.parameters())
        control = list(self.controller.parameters()) if self.masks is not None else []
        special = {id(p) for p in gate_params + control}
        named = [(n, p) for n, p in self.named_parameters() if id(p) not in special]
        groups = param_groups(named, cfg.optim.weight_decay)
        for group in groups:
            group["lr"] = cfg.optim.lr
        schedules = [_warmup_cosine(self.steps_per_epoch(), cfg.optim.warmup_epochs, cfg.trainer.max_epochs)] * len(groups)
        if gate_params:
            groups.append({"params": gate_params + control, "lr": cfg.reg_learning_rate, "weight_decay": 0.0})
            schedules.append(lambda step: 1.0)
        optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedules)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _warmup_cosine(steps_per_epoch: int, warmup_epochs: float, epochs: int):
    import math

    total = max(1, steps_per_epoch * epochs)
    warmup = min(int(warmup_epochs * steps_per_epoch), total - 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return factor
