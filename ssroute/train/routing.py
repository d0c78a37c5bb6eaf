"""Routing terms of a pretraining step: consistency loss over views and stability measurement.

Glue between the pieces: the views' matrices give patch correspondences
(``ssroute.data.correspondence``), the MoE layers' recorded routings give the
distributions (``ssroute.layers.moe.record_routing``), and the pure loss and
meter do the rest (``ssroute.objectives.routing_consistency``,
``ssroute.eval.routing_stability``).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from ssroute.data.correspondence import Correspondence, grid_correspondence, nearest_correspondence
from ssroute.eval.routing_stability import RoutingStabilityMeter
from ssroute.layers.moe import MoELayer
from ssroute.layers.patch_embed import PatchEmbed
from ssroute.objectives.routing_consistency import image_routing_consistency_loss, routing_consistency_loss
from ssroute.patches.base import Patches
from ssroute.routing import Routing
from ssroute.routing.image import ImageRouting

log = logging.getLogger(__name__)


def view_matches(
    patch_embed: PatchEmbed, matrix1: Tensor, matrix2: Tensor, patches: list[Patches] | None = None
) -> tuple[Correspondence, Correspondence]:
    """Correspondences view 1 -> view 2 and view 2 -> view 1 for a batch.

    On the grid the partner is the cell containing the mapped centre. When each view
    selected its own patches (``patches``: the two views' recorded :class:`Patches`,
    see ``ssroute.patches.record_patches``) it is the nearest patch the other view
    took, valid only if the mapped centre lies inside it; patches not taken
    (sequential halting) neither have nor are partners.
    """
    size, patch = patch_embed.image_size, patch_embed.patch_size
    if patch_embed.selector is None:
        centres = patch_embed.centres.expand(matrix1.shape[0], -1, -1)
        return (
            grid_correspondence(centres, matrix1, matrix2, size, patch),
            grid_correspondence(centres, matrix2, matrix1, size, patch),
        )
    if patches is None or len(patches) < 2:
        raise ValueError("selected patches differ per view: pass the two views' recorded patches (ssroute.patches.record_patches)")

    def match(source: Patches, target: Patches, matrix_from: Tensor, matrix_to: Tensor) -> Correspondence:
        other = target.centres if target.mask is None else target.centres.masked_fill(~target.mask[..., None], -1e6)  # untaken: never nearest
        found = nearest_correspondence(source.centres, matrix_from, matrix_to, other, size, patch)
        if source.mask is not None:
            found.valid = found.valid & source.mask
            found.partner = torch.where(found.valid, found.partner, torch.zeros_like(found.partner))
        return found

    return match(patches[0], patches[1], matrix1, matrix2), match(patches[1], patches[0], matrix2, matrix1)


def per_image(routing: Routing, batch: int) -> Tensor:
    """``probs [batch * tokens, experts] -> [batch, tokens, experts]``."""
    return routing.probs.view(batch, -1, routing.probs.shape[-1])


def consistent_layers(model: nn.Module) -> list[str]:
    """Names of MoE layers whose routers learn a distribution (hash and random ones are skipped).

    Routers of whole images (``per_token = False``) are included: they take the image-level loss.
    """
    names, skipped = [], []
    for name, module in model.named_modules():
        if isinstance(module, MoELayer):
            (names if module.router.learned else skipped).append(name)
    if skipped:
        log.info("routing consistency skips %s: their routers have no learned distribution", ", ".join(skipped))
    return names


def consistency_loss(
    recorded: dict[str, list[Routing]], layers: list[str], matches: tuple[Correspondence, Correspondence], batch: int, cfg
) -> Tensor | None:
    """Mean swapped-prediction loss over ``layers`` between the first two recorded views.

    Patches are partnered by ``matches``; routings of whole images (:class:`ImageRouting`) take the
    image-level variant, where the two views of an image are partners.
    """
    m12, m21 = matches
    options = {"temperature": cfg.temperature, "balance": cfg.balance, "entropy_weight": cfg.entropy_weight}

    def layer_loss(first: Routing, second: Routing) -> Tensor:
        if isinstance(first, ImageRouting):
            return image_routing_consistency_loss(first.image_probs, second.image_probs, **options)
        return routing_consistency_loss(
            per_image(first, batch), per_image(second, batch), m12.partner, m12.valid, m21.partner, m21.valid, **options
        )

    losses = [layer_loss(*recorded[name][:2]) for name in layers if len(recorded.get(name, [])) >= 2]
    return torch.stack(losses).mean() if losses else None


@torch.no_grad()
def measure_stability(meter: RoutingStabilityMeter, recorded: dict[str, list[Routing]], matches: tuple[Correspondence, Correspondence], batch: int) -> None:
    """Add one pair of views to ``meter`` for every recorded MoE layer."""
    m12, _ = matches
    for name, routings in recorded.items():
        if len(routings) >= 2:
            load = routings[0].load() + routings[1].load()
            meter.update(name, per_image(routings[0], batch), per_image(routings[1], batch), m12.partner, m12.valid, load)
