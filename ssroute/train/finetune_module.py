"""Supervised fine-tuning of a pretrained backbone as a LightningModule.

``mode=linear`` trains only a linear head on the frozen backbone (run in eval
mode and without autograd); ``mode=full`` trains everything, optionally with
layer-wise learning-rate decay. ``labels_fraction`` keeps a per-class share of
the labelled training images, fixed by seed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ssroute.checkpoint import ModelInputs
from ssroute.data import DataBundle, ImageSet
from ssroute.data.loader import ResumableLoader, loader_workers
from ssroute.data.views import ViewAugment
from ssroute.errors import ConfigError
from ssroute.eval.features import eval_loader, gather_unique
from ssroute.models import build_backbone
from ssroute.train.base import NonFiniteLossError, ResumableModule
from ssroute.train.optim import build_optimizer
from ssroute.train.pretrain_module import mean_over_views
from ssroute.train.superclass_targets import SuperclassTargets, pooled_features


class FinetuneModule(ResumableModule):
    """Backbone + linear classification head.

    Args:
        cfg: the resolved fine-tuning config (its ``model`` is the backbone's config).
        data: the dataset bundle; must be labelled.
        train_set: the labelled training images actually used (after ``labels_fraction``).
        backbone_state: pretrained backbone weights, or None to train from scratch.
    """

    def __init__(self, cfg: DictConfig, data: DataBundle, train_set: ImageSet, backbone_state: dict[str, torch.Tensor] | None) -> None:
        super().__init__()
        self.cfg, self.data, self.train_set = cfg, data, train_set
        self.save_hyperparameters({"config": OmegaConf.to_container(cfg, resolve=True), "inputs": ModelInputs.of_data(data).as_dict()})
        self.backbone = build_backbone(cfg, data.image_size, data.channels)
        if backbone_state is not None:
            self.backbone.load_state_dict(backbone_state)
        # Standardising features before the linear layer (MAE's probe head, He et al. 2021) lets one
        # learning rate suit features of any scale.
        self.head = nn.Sequential(nn.BatchNorm1d(self.backbone.dim, affine=False), nn.Linear(self.backbone.dim, data.num_classes))
        self.augment = ViewAugment(cfg.data.augment, data.channels, data.image_size, data.mean, data.std)
        self.frozen = cfg.mode == "linear"
        if self.frozen:
            self.backbone.requires_grad_(False)
        self.test_top1: float | None = None
        self.superclass = None
        if SuperclassTargets.check(cfg, self.backbone):
            if self.frozen:
                raise ConfigError(
                    "superclass.weight > 0 trains the image routers, which mode=linear freezes; use mode=full or superclass.weight=0."
                )
            if not cfg.checkpoint and not cfg.superclass.checkpoint:
                raise ConfigError(
                    "superclass.weight > 0 clusters class-mean features of a trained model; pass checkpoint=RUN or superclass.checkpoint=RUN."
                )
            # super-class of each class; computed when fitting starts, then kept in checkpoints so a resume reuses it
            self.superclass = SuperclassTargets(cfg.superclass.weight, cfg.model.num_experts, data.num_classes, by_class=True,
                                                niter=cfg.superclass.niter, seed=cfg.seed)  # fmt: skip
        self._outputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def train_dataloader(self) -> ResumableLoader:
        batch = min(self.cfg.data.batch_size, len(self.train_set) // self.trainer.world_size)
        return ResumableLoader(
            self.train_set,
            batch,
            self.cfg.seed,
            self.global_rank,
            self.trainer.world_size,
            num_workers=loader_workers(self.cfg.data.num_workers, self.train_set),
        )

    def val_dataloader(self):
        return eval_loader(
            self.data.test, self.cfg.eval_batch_size, self.global_rank, self.trainer.world_size, self.cfg.data.num_workers or 0
        )

    def features(self, images: torch.Tensor):
        """``(features [batch, dim], ForwardAux)``; a frozen backbone (``mode=linear``) runs in eval mode without autograd."""
        if self.frozen:
            self.backbone.eval()
            with torch.no_grad():
                return self.backbone(images)
        return self.backbone(images)

    def on_fit_start(self) -> None:
        if self.superclass is not None and not self.superclass.ready:
            self.find_superclasses()

    def find_superclasses(self) -> None:
        """Super-class ids of the classes: k-means of class-mean features of the model before fine-tuning (or of
        ``superclass.checkpoint``), numbered to agree most with the image routers' current choices."""
        loader = eval_loader(
            self.train_set, self.cfg.eval_batch_size, self.global_rank, self.trainer.world_size, self.cfg.data.num_workers or 0
        )
        found = pooled_features(self.backbone, loader, self.augment.normalize, self.device)
        if self.cfg.superclass.checkpoint:
            source = feature_backbone(self.cfg.superclass.checkpoint, self.data).to(self.device)
            found["features"] = pooled_features(source, loader, self.augment.normalize, self.device)["features"]
        features, labels, top1 = gather_unique(
            self.all_gather,
            found["features"],
            found["labels"],
            found["router_top1"],
            index=found["index"],
            world_size=self.trainer.world_size,
        )
        self.superclass.fit_classes(features, labels, top1, self.data.num_classes)

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        images, labels, _ = batch
        view = self.augment.view(images)[0]
        features, aux = self.features(view)
        logits = self.head(features)
        losses = {"classification": F.cross_entropy(logits, labels, label_smoothing=self.cfg.label_smoothing)}
        if not self.frozen:
            losses.update(mean_over_views([aux.losses]))  # router balance, ponder costs
        if self.superclass is not None:
            losses.update(self.superclass.losses(self, [aux], labels))
        total = torch.stack(list(losses.values())).sum()
        if not torch.isfinite(total):
            raise NonFiniteLossError(
                f"the loss became {total.item()} at step {self.global_step}; lower optim.lr. The last good checkpoint is kept."
            )
        self.log("loss", total, prog_bar=True)
        self.log_dict({f"loss/{name}": value for name, value in losses.items()})
        self.log("train_top1", (logits.argmax(1) == labels).float().mean(), prog_bar=True)
        self.log_routing(aux)
        return total

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        images, labels, index = batch
        logits = self.head(self.backbone(self.augment.normalize(images))[0])
        self._outputs.append((logits.argmax(1), labels, index))

    def on_validation_epoch_end(self) -> None:
        predicted, labels, index = (torch.cat(parts) for parts in zip(*self._outputs, strict=True))
        self._outputs.clear()
        predicted, labels = gather_unique(self.all_gather, predicted, labels, index=index, world_size=self.trainer.world_size)
        self.test_top1 = float((predicted == labels).float().mean())
        self.log("test_top1", self.test_top1, prog_bar=True, rank_zero_only=True)

    def configure_optimizers(self):
        steps = max(1, len(self.train_set) // self.trainer.world_size // min(self.cfg.data.batch_size, len(self.train_set)))
        lr_scale = None
        if self.cfg.mode == "full" and self.cfg.layer_decay < 1.0:
            depth = len(self.backbone.blocks)
            lr_scale = {"backbone.patch_embed": self.cfg.layer_decay ** (depth + 1)}
            lr_scale.update({f"backbone.blocks.{i}.": self.cfg.layer_decay ** (depth - i) for i in range(depth)})
        return build_optimizer(self, self.cfg.optim, steps, self.cfg.trainer.max_epochs, lr_scale)


def feature_backbone(checkpoint: str, data: DataBundle) -> nn.Module:
    """The backbone of another run (``superclass.checkpoint``), built from its own config, in eval mode."""
    from ssroute.checkpoint import load_backbone

    backbone, _, _ = load_backbone(checkpoint, data)
    return backbone.requires_grad_(False)
