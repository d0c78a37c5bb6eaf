"""Super-class targets for image routers during training (Mobile V-MoE, arXiv 2309.04354).

The clustering and the loss are ``ssroute.objectives.superclass``; this is where
the clusters come from and how a step gets its targets:

- **fine-tuning (labels)**: class-mean features of a trained model — the
  checkpoint being fine-tuned, before it trains, or ``superclass.checkpoint`` —
  give each class a super-class; a step's targets are ``superclass_of[labels]``;
- **pretraining (no labels)**: at the start of every epoch in which an image
  router trains, the training images are clustered by what that router pools
  (``ImageRouting.pooled``; in a layerwise stack the blocks below are frozen, so
  the clusters are those of the frozen stage below); a step's targets are
  ``cluster_of[dataset index]``.

Either way ids are relabelled to agree most with the router's current top-1
(or the previous epoch's clusters). The targets are buffers of this module, so
they are in every checkpoint and a resumed run reuses them.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from ssroute.errors import ConfigError
from ssroute.eval.features import eval_loader, evaluating, gather_unique
from ssroute.moe import moe_layers
from ssroute.objectives.superclass import align_clusters, class_superclasses, cluster_permutation, image_clusters, superclass_loss
from ssroute.routing.image import ImageRouter, ImageRouting

log = logging.getLogger(__name__)


def image_blocks(backbone: nn.Module) -> list[int]:
    """Indices of the blocks whose MoE layer routes whole images."""
    return [i for i, m in moe_layers(backbone).items() if isinstance(m.router, ImageRouter)]


def pooled_features(backbone: nn.Module, loader, normalize, device: torch.device, block: int | None = None) -> dict[str, Tensor]:
    """Features of every image of ``loader``, in eval mode: ``features`` (the backbone's pooled output, or what the
    image router of ``block`` pooled), ``labels``, ``index`` and ``router_top1`` (the first image router's choice)."""
    blocks = image_blocks(backbone)
    reference = block if block is not None else (blocks[0] if blocks else None)
    out: dict[str, list[Tensor]] = {"features": [], "labels": [], "index": [], "router_top1": []}
    with evaluating(backbone):
        for images, labels, index in loader:
            features, aux = backbone(normalize(images.to(device)))
            routing = aux.routings.get(reference) if reference is not None else None
            out["features"].append((routing.pooled if block is not None else features).float())
            out["labels"].append(labels.to(device))
            out["index"].append(index.to(device))
            if isinstance(routing, ImageRouting):
                out["router_top1"].append(routing.image_probs.argmax(dim=-1))
    return {key: torch.cat(parts) for key, parts in out.items() if parts}


class SuperclassTargets(nn.Module):
    """Super-class ids of the training images (pretraining) or classes (fine-tuning), and the step's loss.

    Args:
        weight: ``superclass.weight``, the weight of the routers' cross-entropy.
        num_experts: super-classes (one per expert).
        size: training images (pretraining) or classes (fine-tuning).
        by_class: targets come from labels (fine-tuning) rather than dataset indices.
        niter: faiss k-means iterations.
        seed: k-means++ seed.
    """

    def __init__(self, weight: float, num_experts: int, size: int, by_class: bool, niter: int = 20, seed: int = 0) -> None:
        super().__init__()
        self.weight, self.num_experts, self.by_class, self.niter, self.seed = weight, num_experts, by_class, niter, seed
        self.register_buffer("target_of", torch.full((size,), -1, dtype=torch.long))  # super-class by dataset index or by class
        self.register_buffer("epoch", torch.tensor(-1))  # the epoch the image clusters were computed for

    @classmethod
    def check(cls, cfg: Any, backbone: nn.Module) -> bool:
        """True when super-class training is on; a ConfigError when it is on without an image router."""
        superclass = cfg.get("superclass")
        if superclass is None or superclass.weight <= 0:
            return False
        if not image_blocks(backbone):
            raise ConfigError(
                f"superclass.weight={superclass.weight} needs an image-routed MoE layer; set router=image (and model.moe_layers or model.stack)."
            )
        return True

    @classmethod
    def for_pretraining(cls, cfg: Any, backbone: nn.Module, train_images: int | None = None) -> SuperclassTargets | None:
        if not cls.check(cfg, backbone):
            return None
        if cfg.superclass.checkpoint is not None:
            raise ConfigError(
                "superclass.checkpoint is for fine-tuning; pretraining clusters its own images, so drop superclass.checkpoint."
            )
        return cls(
            cfg.superclass.weight, cfg.model.num_experts, train_images or 0, by_class=False, niter=cfg.superclass.niter, seed=cfg.seed
        )

    # -- pretraining: image clusters --------------------------------------------------------------
    def refresh_clusters(self, module, training_blocks: range) -> None:
        """Cluster the training images by what the first image router among ``training_blocks`` pools (once per epoch)."""
        blocks = [b for b in image_blocks(module.backbone) if b in training_blocks]
        epoch = module.current_epoch
        if not blocks or int(self.epoch) == epoch:
            return  # no image router trains now, or the clusters came with a resumed checkpoint
        data, trainer = module.data.train, module.trainer
        if self.target_of.numel() != len(data):
            self.target_of = torch.full((len(data),), -1, dtype=torch.long, device=module.device)
        loader = eval_loader(data, module.cfg.eval_batch_size, trainer.global_rank, trainer.world_size, module.cfg.data.num_workers or 0)
        found = pooled_features(module.backbone, loader, module.augment.normalize, module.device, blocks[0])
        features, top1, index = gather_unique(
            module.all_gather, found["features"], found["router_top1"], found["index"], index=found["index"], world_size=trainer.world_size
        )
        assign = image_clusters(features, self.num_experts, self.niter, self.seed)
        previous = self.target_of.cpu()[index] if bool((self.target_of >= 0).all()) else top1
        self.target_of[index.to(self.target_of.device)] = align_clusters(assign, previous, self.num_experts).to(self.target_of.device)
        self.epoch.fill_(epoch)
        sizes = torch.bincount(self.target_of, minlength=self.num_experts).tolist()
        log.info("super-class routing: %d images in %d clusters of sizes %s (epoch %d)", len(data), self.num_experts, sizes, epoch)

    # -- fine-tuning: class super-classes ---------------------------------------------------------
    def fit_classes(self, features: Tensor, labels: Tensor, router_top1: Tensor, num_classes: int) -> None:
        """Super-class of each class from class-mean ``features``, numbered to agree most with the routers' ``router_top1``."""
        groups = class_superclasses(features, labels, num_classes, self.num_experts, self.niter, self.seed)
        self.target_of.copy_(cluster_permutation(groups[labels], router_top1, self.num_experts)[groups].to(self.target_of.device))

    @property
    def ready(self) -> bool:
        return bool((self.target_of >= 0).all()) and self.target_of.numel() > 0

    # -- a step -----------------------------------------------------------------------------------
    def losses(self, module, auxes: list, keys: Tensor, first_block: int = 0) -> dict[str, Tensor]:
        """The step's super-class loss (mean over views) for the image routers at or after ``first_block``; its accuracy is logged.

        ``keys``: the batch's dataset indices (pretraining) or labels (fine-tuning).
        """
        if not self.ready:
            return {}
        targets = self.target_of[keys.to(self.target_of.device)]
        found = [superclass_loss({b: r for b, r in aux.routings.items() if b >= first_block}, targets, self.weight) for aux in auxes]
        found = [(loss, acc) for loss, acc in found if loss]
        if not found:
            return {}
        module.log("superclass_top1", torch.stack([acc["superclass_top1"] for _, acc in found]).mean())
        return {"superclass": torch.stack([loss["superclass"] for loss, _ in found]).mean()}
