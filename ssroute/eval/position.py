"""Does routing follow the content or the position? Two measurements on held-out, un-augmented images.

A router can meet augmentation consistency and balance by partitioning the
patch grid (the left column to one expert, the top rows to another): such
routing is balanced and perfectly consistent under photometric changes, but it
is not conditional computation on content. Per MoE block, on the executed top-1
experts (:meth:`~ssroute.routing.Routing.executed_top1`; dropped tokens left out):

- ``routing_position_nmi``: normalised mutual information (scikit-learn's
  arithmetic NMI) between a token's expert and its position (the grid cell of
  its centre); 0 = position says nothing of the expert; with fewer experts
  than positions, a grid partition reaches ``2 H(E) / (H(E) + H(position))``;
- ``routing_position_majority``: the share of decisions that the majority
  expert of each position predicts (1 = a partition of the grid; read it next
  to the usage entropy: one dominant expert also makes it high);
- ``routing_shift_content``: the image content moved by exactly one patch
  (zero padding), in each of the four directions. A token of the moved image
  has a *content expert* (the expert the original token showing the same
  content got) and a *position expert* (the expert of the original token at its
  position). Among tokens where the two differ, the share whose expert follows
  the content; ``routing_shift_position`` is the share that keeps the expert of
  the position, ``routing_shift_dropped`` the share dropped in the moved image.

Both work for grid and selected patches: content and position partners are
found by the same correspondence search as augmented views
(``ssroute.data.correspondence``), with the shift's translation matrix.

>>> import torch
>>> from ssroute.moe import build_moe
>>> from ssroute.models.vit import ViT
>>> vit = ViT(image_size=8, channels=1, dim=16, depth=1, heads=2, patch_size=2,
...           ffn_factory=lambda i: build_moe(dim=16, hidden=16, num_experts=4, capacity_factor=None))
>>> metrics = position_metrics(vit, lambda x: x.float() / 255, torch.randint(0, 255, (6, 1, 8, 8), dtype=torch.uint8))
>>> sorted(k for k in metrics if k.startswith("block0/routing_position"))
['block0/routing_position_majority', 'block0/routing_position_nmi']
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ssroute.data.correspondence import view_matches
from ssroute.eval.analytics import joint_counts, normalized_mutual_information
from ssroute.eval.features import evaluating

SHIFTS = ((1, 0), (-1, 0), (0, 1), (0, -1))  # in patches: right, left, down, up


def shift_images(images: Tensor, dx: int, dy: int) -> Tensor:
    """Images moved by ``(dx, dy)`` pixels, the uncovered border filled with zeros."""
    out = torch.zeros_like(images)
    h, w = images.shape[-2:]
    out[..., max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = images[..., max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)]
    return out


def translation(dx: float, dy: float, batch: int, device) -> Tensor:
    """``[batch, 3, 3]`` the matrix mapping original pixels to pixels moved by ``(dx, dy)``."""
    matrix = torch.eye(3, device=device).repeat(batch, 1, 1)
    matrix[:, 0, 2], matrix[:, 1, 2] = dx, dy
    return matrix


def _route(backbone: nn.Module, images: Tensor, batch_size: int) -> tuple[dict[int, Tensor], Tensor, Tensor | None]:
    """Executed top-1 ``[images, tokens]`` per block, centres ``[images, tokens, 2]`` and mask of patches taken."""
    tops: dict[int, list[Tensor]] = {}
    centres, masks = [], []
    for chunk in images.split(batch_size):
        _, aux = backbone(chunk)
        for block, routing in aux.routings.items():
            tops.setdefault(block, []).append(routing.executed_top1().view(chunk.shape[0], -1))
        centres.append(aux.patches.centres)
        masks.append(aux.patches.mask)
    mask = None if masks[0] is None else torch.cat(masks)
    return {b: torch.cat(t) for b, t in tops.items()}, torch.cat(centres), mask


def position_metrics(
    backbone: nn.Module, normalize: Callable[[Tensor], Tensor], images_uint8: Tensor, batch_size: int = 256
) -> dict[str, float]:
    """``block{i}/routing_position_nmi``, ``block{i}/routing_shift_content`` (``_position``, ``_dropped``) and their
    means over blocks, for every MoE block of ``backbone`` on ``images_uint8 [images, C, H, W]`` (uint8, its device)."""
    embed = backbone.patch_embed
    size, patch = embed.image_size, embed.patch_size
    side = size // patch
    batch = images_uint8.shape[0]
    ones = torch.ones_like(images_uint8[:, :1], dtype=torch.float32)
    out: dict[str, float] = {}
    with evaluating(backbone):
        original, centres, mask = _route(backbone, normalize(images_uint8), batch_size)
        cell = (centres / patch).floor().long().clamp(0, side - 1)
        position = cell[..., 1] * side + cell[..., 0]
        for block, top in original.items():
            kept = top >= 0 if mask is None else (top >= 0) & mask
            counts = joint_counts(top[kept], position[kept], int(top.max()) + 1, side * side)
            out[f"block{block}/routing_position_nmi"] = normalized_mutual_information(counts)
            out[f"block{block}/routing_position_majority"] = float(counts.max(dim=0).values.sum() / counts.sum().clamp_min(1))
        follows = {b: torch.zeros(3, dtype=torch.long) for b in original}  # content, position, dropped
        eligible = {b: 0 for b in original}
        identity = translation(0, 0, batch, images_uint8.device)
        for dx, dy in SHIFTS:
            moved_images = shift_images(images_uint8, dx * patch, dy * patch)
            moved, moved_centres, moved_mask = _route(backbone, normalize(moved_images), batch_size)
            content = shift_images(ones, dx * patch, dy * patch)
            shift = translation(dx * patch, dy * patch, batch, images_uint8.device)
            grid = embed.selector is None
            geometry = dict(image_size=size, patch_size=patch, grid=grid, masks=(moved_mask, mask))
            by_content, _ = view_matches((shift, identity), (moved_centres, centres), content=(content, ones), **geometry)
            by_position, _ = view_matches((identity, identity), (moved_centres, centres), **geometry)
            for block, top in moved.items():
                content_expert = torch.gather(original[block], 1, by_content.partner)
                position_expert = torch.gather(original[block], 1, by_position.partner)
                differ = by_content.valid & by_position.valid & (content_expert >= 0) & (position_expert >= 0) & (content_expert != position_expert)
                eligible[block] += int(differ.sum())
                follows[block] += torch.stack([
                    ((top == content_expert) & differ).sum(), ((top == position_expert) & differ).sum(), ((top < 0) & differ).sum()
                ]).cpu()  # fmt: skip
        for block in original:
            if eligible[block]:
                share = follows[block].double() / eligible[block]
                out[f"block{block}/routing_shift_content"] = float(share[0])
                out[f"block{block}/routing_shift_position"] = float(share[1])
                out[f"block{block}/routing_shift_dropped"] = float(share[2])
    for metric in ("routing_position_nmi", "routing_position_majority", "routing_shift_content", "routing_shift_position", "routing_shift_dropped"):
        values = [v for k, v in out.items() if k.endswith(f"/{metric}")]
        if values:
            out[metric] = sum(values) / len(values)
    return out
