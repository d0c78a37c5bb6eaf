"""Super-class targets for image routers during training (Mobile V-MoE, arXiv 2309.04354).

The clustering is ``ssroute.routing.superclass``; this is where its inputs come
from and where its ids reach the routers:

- **fine-tuning (labels)**: class-mean features of a trained model — the
  checkpoint being fine-tuned, before it trains, or ``superclass.checkpoint`` —
  give each class a super-class; a step's targets are ``superclass_of[labels]``
  (``ssroute.train.finetune_module``);
- **pretraining (no labels)**: :class:`SuperclassClusters` clusters the images by
  what the first training image router pools — the mean of its input tokens —
  at the start of every epoch in which that block trains (in a layerwise stack
  the blocks below are frozen, so the clusters are those of the frozen stage
  below); a step's targets are ``cluster_of[dataset index]``.

Either way the ids are relabelled to agree most with the router's current top-1
(or the previous epoch's clusters), and set on every image router with
:func:`superclass_targets` for the training forward; the router adds
``superclass.weight`` x cross-entropy to its auxiliary loss.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from ssroute.errors import ConfigError
from ssroute.eval.features import eval_loader, gather_unique
from ssroute.layers.moe import MoELayer
from ssroute.routing.image import ImageRouter
from ssroute.routing.superclass import align_clusters, image_clusters

log = logging.getLogger(__name__)


def image_layers(model: nn.Module) -> dict[str, MoELayer]:
    """MoE layers of ``model`` whose router routes whole images, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoELayer) and isinstance(m.router, ImageRouter)}


def check_superclass(cfg: Any, model: nn.Module) -> dict[str, MoELayer]:
    """The image-routed layers super-class training acts on; a ConfigError when it is on and there are none."""
    layers = image_layers(model)
    if cfg.superclass.weight > 0 and not layers:
        raise ConfigError(
            f"superclass.weight={cfg.superclass.weight} needs an image-routed MoE layer; set router=image (and model.moe_layers or model.stack)."
        )
    return layers


@contextmanager
def superclass_targets(layers: dict[str, MoELayer], targets: Tensor, weight: float) -> Iterator[None]:
    """Image routers of ``layers`` train towards ``targets [images]`` inside this context."""
    for layer in layers.values():
        layer.router.set_superclass_targets(targets, weight)
    try:
        yield
    finally:
        for layer in layers.values():
            layer.router.set_superclass_targets(None)


@torch.no_grad()
def pooled_features(backbone: nn.Module, loader, normalize, device: torch.device, layer: MoELayer | None = None) -> dict[str, Tensor]:
    """Features of every image of ``loader``, in eval mode: ``features`` (the backbone's pooled output, or the
    mean input tokens of ``layer``), ``labels``, ``index`` and ``router_top1`` (the first image router's choice)."""
    routers = list(image_layers(backbone).values())
    reference = layer if layer is not None else (routers[0] if routers else None)
    captured: list[Tensor] = []
    hook = layer.register_forward_pre_hook(lambda _, args: captured.append(args[0].mean(dim=1).float())) if layer is not None else None
    was_training = backbone.training
    backbone.eval()
    out: dict[str, list[Tensor]] = {"features": [], "labels": [], "index": [], "router_top1": []}
    try:
        for images, labels, index in loader:
            features = backbone(normalize(images.to(device))).float()
            out["features"].append(captured.pop() if hook is not None else features)
            out["labels"].append(labels.to(device))
            out["index"].append(index.to(device))
            if reference is not None:
                out["router_top1"].append(reference.last_routing.image_probs.argmax(dim=-1))
    finally:
        if hook is not None:
            hook.remove()
        backbone.train(was_training)
    return {key: torch.cat(parts) for key, parts in out.items() if parts}


class SuperclassClusters(pl.Callback):
    """Pretraining without labels: k-means clusters of the images as the image routers' targets.

    Args:
        weight: ``superclass.weight``, the weight of the routers' cross-entropy.
        num_experts: clusters (one per expert).
        niter: faiss k-means iterations.
        seed: k-means++ seed.
    """

    def __init__(self, weight: float, num_experts: int, niter: int = 20, seed: int = 0) -> None:
        self.weight, self.num_experts, self.niter, self.seed = weight, num_experts, niter, seed
        self.cluster_of: Tensor | None = None  # [train images] cluster id by dataset index
        self.epoch = -1  # the epoch cluster_of was computed for
        self._active: dict[str, MoELayer] = {}

    def _training_layers(self, module: pl.LightningModule) -> dict[str, MoELayer]:
        """Image-routed layers that train in the current epoch (the stage's blocks in a layerwise schedule)."""
        layers = image_layers(module.backbone)
        _, encoder, _ = module.current()
        if not hasattr(encoder, "first"):
            return layers
        first, last = module.stages[encoder.first][0], module.stages[encoder.last][1]
        return {name: layer for name, layer in layers.items() if first <= int(name.split(".")[1]) < last}

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._active = self._training_layers(module)
        if not self._active or self.epoch == trainer.current_epoch:
            return  # no image router trains now, or the clusters came with a resumed checkpoint
        data = module.data.train
        loader = eval_loader(data, module.cfg.eval_batch_size, trainer.global_rank, trainer.world_size, module.cfg.data.num_workers)
        found = pooled_features(module.backbone, loader, module.augment.normalize, module.device, next(iter(self._active.values())))
        features, top1, index = gather_unique(
            module.all_gather, found["features"], found["router_top1"], found["index"], index=found["index"], world_size=trainer.world_size
        )
        assign = image_clusters(features, self.num_experts, self.niter, self.seed)
        previous = self.cluster_of.cpu()[index] if self.cluster_of is not None else top1
        self.cluster_of = torch.empty(len(data), dtype=torch.long)
        self.cluster_of[index] = align_clusters(assign, previous, self.num_experts)
        self.cluster_of = self.cluster_of.to(module.device)
        self.epoch = trainer.current_epoch
        sizes = torch.bincount(self.cluster_of, minlength=self.num_experts).tolist()
        log.info("super-class routing: %d images in %d clusters of sizes %s (epoch %d)", len(data), self.num_experts, sizes, self.epoch)

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._active:
            for layer in self._active.values():
                layer.router.set_superclass_targets(self.cluster_of[batch[2].to(self.cluster_of.device)], self.weight)

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        for layer in self._active.values():
            layer.router.set_superclass_targets(None)
        log_superclass(module, self._active)

    def state_dict(self) -> dict[str, Any]:
        return {"cluster_of": None if self.cluster_of is None else self.cluster_of.cpu(), "epoch": self.epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.cluster_of, self.epoch = state_dict["cluster_of"], state_dict["epoch"]


def log_superclass(module: pl.LightningModule, layers: dict[str, MoELayer]) -> None:
    """Log the last training forward's super-class cross-entropy and router accuracy, mean over ``layers``."""
    losses = [m.router.last_superclass_loss for m in layers.values() if m.router.last_superclass_loss is not None]
    if losses:
        module.log("superclass_ce", torch.stack(losses).mean())
        module.log("superclass_top1", torch.stack([m.router.last_superclass_accuracy for m in layers.values()]).mean())


def superclass_callbacks(cfg: Any, backbone: nn.Module) -> list[pl.Callback]:
    """Pretraining's super-class callback when ``superclass.weight > 0`` (checked against the model), else none."""
    if cfg.get("superclass") is None or cfg.superclass.weight <= 0:
        return []
    check_superclass(cfg, backbone)
    if cfg.superclass.checkpoint is not None:
        raise ConfigError("superclass.checkpoint is for fine-tuning; pretraining clusters its own images, so drop superclass.checkpoint.")
    return [SuperclassClusters(cfg.superclass.weight, cfg.model.num_experts, cfg.superclass.niter, cfg.seed)]
