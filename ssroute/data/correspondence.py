"""Which patch of one augmented view shows the same place as a patch of another.

Each view keeps the 3x3 matrix ``M`` mapping original-image pixels to view
pixels (``ssroute.data.views``). A patch centre ``p`` in view 1 is mapped back
to the image and forward into view 2, ``q = M2 · M1⁻¹ · p`` (homogeneous
coordinates), and its partner is the view-2 patch that contains ``q``. A patch
whose centre leaves view 2 (cropped away or rotated out) has no partner and is
masked out. Photometric augmentations do not move pixels and do not enter.

Coordinates are pixel indices: pixel ``(x, y)`` covers ``[x-0.5, x+0.5) x
[y-0.5, y+0.5)``, as kornia's matrices and ``ssroute.layers.patch_embed``
centres assume. Shapes: centres ``[batch, tokens, 2]`` (x, y); matrices
``[batch, 3, 3]``; partners and masks ``[batch, tokens]``.

>>> import torch
>>> identity = torch.eye(3).expand(1, 3, 3)
>>> centres = torch.tensor([[[0.5, 0.5], [2.5, 0.5], [0.5, 2.5], [2.5, 2.5]]])
>>> match = grid_correspondence(centres, identity, identity, image_size=4, patch_size=2)
>>> match.partner.tolist(), match.valid.tolist()
([[0, 1, 2, 3]], [[True, True, True, True]])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Correspondence:
    partner: Tensor  # [batch, tokens] index of the partner token in the other view (0 where invalid)
    valid: Tensor  # [batch, tokens] the partner exists (the mapped centre lies inside the other view)
    mapped: Tensor  # [batch, tokens, 2] the centre mapped into the other view's pixels


def map_points(points: Tensor, matrix: Tensor) -> Tensor:
    """Apply ``[batch, 3, 3]`` homographies to ``[batch, tokens, 2]`` points."""
    homogeneous = torch.cat([points, torch.ones_like(points[..., :1])], dim=-1)
    mapped = homogeneous @ matrix.transpose(1, 2)
    return mapped[..., :2] / mapped[..., 2:]


def view_to_view(centres: Tensor, matrix_from: Tensor, matrix_to: Tensor) -> Tensor:
    """Points in one view's pixels -> the same image points in another view's pixels."""
    # float64 for the inverse: crops scaled several times over lose 1e-4 px in float32
    between = matrix_to.double() @ torch.linalg.inv(matrix_from.double())
    return map_points(centres.double(), between).to(centres.dtype)


def grid_correspondence(centres: Tensor, matrix_from: Tensor, matrix_to: Tensor, image_size: int, patch_size: int) -> Correspondence:
    """Partners among the other view's row-major patch grid (no search: the containing cell)."""
    mapped = view_to_view(centres, matrix_from, matrix_to)
    cell = torch.floor((mapped + 0.5) / patch_size).long()  # [batch, tokens, 2] (column, row)
    side = image_size // patch_size
    valid = ((mapped >= -0.5) & (mapped < image_size - 0.5)).all(dim=-1)
    cell = cell.clamp(0, side - 1)
    partner = torch.where(valid, cell[..., 1] * side + cell[..., 0], torch.zeros_like(cell[..., 0]))
    return Correspondence(partner, valid, mapped)


def nearest_correspondence(
    centres: Tensor, matrix_from: Tensor, matrix_to: Tensor, other_centres: Tensor, image_size: int, patch_size: int
) -> Correspondence:
    """Partners among arbitrary patch centres of the other view (non-grid patches).

    The partner is the nearest other-view centre; it counts only if the mapped
    point falls inside that patch's square and inside the view.
    """
    mapped = view_to_view(centres, matrix_from, matrix_to)
    distance = torch.cdist(mapped, other_centres.to(mapped.dtype))  # [batch, tokens, other]
    partner = distance.argmin(dim=-1)
    nearest = torch.gather(other_centres.to(mapped.dtype), 1, partner.unsqueeze(-1).expand(-1, -1, 2))
    inside_patch = ((mapped - nearest).abs() <= patch_size / 2).all(dim=-1)
    inside_view = ((mapped >= -0.5) & (mapped < image_size - 0.5)).all(dim=-1)
    valid = inside_patch & inside_view
    return Correspondence(torch.where(valid, partner, torch.zeros_like(partner)), valid, mapped)
