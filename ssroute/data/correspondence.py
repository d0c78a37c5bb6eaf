"""Which patch of one augmented view shows the same place as a patch of another.

Each view keeps the 3x3 matrix ``M`` mapping original-image pixels to view
pixels (``ssroute.data.views``). A patch centre ``p`` in view 1 is mapped back
to the image and forward into view 2, ``q = M2 · M1⁻¹ · p`` (homogeneous
coordinates), and its partner is the view-2 patch that contains ``q``. A patch
whose centre leaves view 2 (cropped away or rotated out) has no partner and is
masked out, and so is a pair in which either patch shows mostly padding: a
rotation after the crop fills the view's corners with zeros that the inverse
matrix maps back onto image pixels the view does not show. Each view carries a
content mask (the same warp applied to an all-ones image,
``ssroute.data.views``); a patch counts when at least half of it is image
content. Photometric augmentations do not move pixels and do not enter.

Besides the containing patch, a grid correspondence also gives *soft
partners*: the four view-2 patches around the mapped point with bilinear
weights (:func:`partner_blend`), since the containing patch can be half a patch
off and, after a zoom, cover a different area. Where the mapped point falls on
a patch centre the blend is that patch alone.

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
import torch.nn.functional as F
from torch import Tensor

MIN_CONTENT = 0.5  # a patch takes part in a pair when at least this share of it shows the image, not padding


@dataclass
class Correspondence:
    partner: Tensor  # [batch, tokens] index of the partner token in the other view (0 where invalid)
    valid: Tensor  # [batch, tokens] the partner exists (the mapped centre lies inside the other view)
    mapped: Tensor  # [batch, tokens, 2] the centre mapped into the other view's pixels
    neighbours: Tensor | None = None  # [batch, tokens, K] soft partners: other-view tokens around the mapped point
    weights: Tensor | None = None  # [batch, tokens, K] their bilinear weights (sum to 1); None = the partner alone


def partner_blend(values: Tensor, match: Correspondence, soft: bool = True) -> Tensor:
    """Each token's partner value from the other view's ``values [batch, tokens, ...]``: the bilinear blend
    of its soft partners (``soft`` and a grid correspondence), else the containing patch's value.

    >>> import torch
    >>> values = torch.tensor([[[0.0], [10.0], [20.0], [30.0]]])  # a 2x2 grid of 2-pixel patches
    >>> match = grid_correspondence(torch.tensor([[[1.5, 0.5]]]), torch.eye(3)[None], torch.eye(3)[None], image_size=4, patch_size=2)
    >>> partner_blend(values, match).tolist(), partner_blend(values, match, soft=False).tolist()  # halfway between patches 0 and 1
    ([[[5.0]]], [[[10.0]]])
    """
    if not soft or match.neighbours is None:
        index = match.partner.reshape(*match.partner.shape, *([1] * (values.dim() - 2))).expand(-1, -1, *values.shape[2:])
        return torch.gather(values, 1, index)
    batch, tokens, k = match.neighbours.shape
    index = match.neighbours.reshape(batch, tokens * k, *([1] * (values.dim() - 2))).expand(-1, -1, *values.shape[2:])
    gathered = torch.gather(values, 1, index).view(batch, tokens, k, *values.shape[2:])
    weights = match.weights.to(values.dtype).view(batch, tokens, k, *([1] * (values.dim() - 2)))
    return (weights * gathered).sum(dim=2)


def bilinear_cells(mapped: Tensor, image_size: int, patch_size: int) -> tuple[Tensor, Tensor]:
    """``[batch, tokens, 2]`` points -> the 4 grid cells around each (row-major indices) and their bilinear
    weights ``[batch, tokens, 4]``; cells off the grid get weight 0 and the rest are renormalised."""
    side = image_size // patch_size
    cell = (mapped - (patch_size - 1) / 2) / patch_size  # fractional cell coordinates (x, y)
    low = torch.floor(cell)
    frac = cell - low
    dx = torch.tensor([0, 1, 0, 1], device=mapped.device)
    dy = torch.tensor([0, 0, 1, 1], device=mapped.device)
    cx, cy = low[..., :1].long() + dx, low[..., 1:].long() + dy  # [batch, tokens, 4]
    wx = torch.where(dx == 1, frac[..., :1], 1 - frac[..., :1])
    wy = torch.where(dy == 1, frac[..., 1:], 1 - frac[..., 1:])
    on_grid = (cx >= 0) & (cx < side) & (cy >= 0) & (cy < side)
    weights = wx * wy * on_grid
    weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    return cy.clamp(0, side - 1) * side + cx.clamp(0, side - 1), weights


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
    neighbours, weights = bilinear_cells(mapped, image_size, patch_size)
    return Correspondence(partner, valid, mapped, neighbours, weights)


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


def extract_patches(images: Tensor, centres: Tensor, patch_size: int) -> Tensor:
    """Pixels of square patches at continuous centres: ``[B, C, H, W], [B, N, 2] -> [B, N, C * p * p]``.

    Flattened as ``(channel, row, column)``, the layout of a ``Conv2d`` kernel, so a
    patch embedding's convolution weights apply to it as a linear map. Outside the
    image counts as 0. Bilinear, so any real centre works; at integer pixel
    offsets it copies pixels exactly.
    """
    batch, channels, height, width = images.shape
    offsets = torch.arange(patch_size, device=images.device, dtype=centres.dtype) - (patch_size - 1) / 2
    dy, dx = torch.meshgrid(offsets, offsets, indexing="ij")
    x = centres[:, :, None, None, 0] + dx  # [B, N, p, p]
    y = centres[:, :, None, None, 1] + dy
    # grid_sample's align_corners=False coordinates: pixel index i sits at (2 i + 1) / size - 1
    grid = torch.stack([(2 * x + 1) / width - 1, (2 * y + 1) / height - 1], dim=-1)
    sampled = F.grid_sample(
        images, grid.reshape(batch, -1, patch_size, 2).to(images.dtype), mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return sampled.view(batch, channels, -1, patch_size, patch_size).transpose(1, 2).flatten(2)  # [B, N, C*p*p]


def content_share(content: Tensor, centres: Tensor, patch_size: int) -> Tensor:
    """``[B, 1, H, W]`` content mask (1 = image, 0 = padding), ``[B, N, 2]`` centres -> ``[B, N]`` share of each patch that is image."""
    return extract_patches(content, centres, patch_size).mean(dim=-1)


def view_matches(
    matrices: tuple[Tensor, Tensor],
    centres: tuple[Tensor, Tensor],
    image_size: int,
    patch_size: int,
    *,
    grid: bool,
    masks: tuple[Tensor | None, Tensor | None] = (None, None),
    content: tuple[Tensor, Tensor] | None = None,
) -> tuple[Correspondence, Correspondence]:
    """Correspondences view 1 -> view 2 and view 2 -> view 1 for a batch.

    Args:
        matrices: the views' ``[B, 3, 3]`` original -> view pixel matrices.
        centres: each view's patch centres ``[B, N, 2]``.
        image_size, patch_size: pixels of the (square) views and patches.
        grid: both views tokenise the row-major grid: the partner is the cell that
            contains the mapped centre. Otherwise each view took its own patches and
            the partner is the nearest patch the other view took, valid if the
            mapped centre lies inside it.
        masks: each view's ``[B, N]`` patches taken (a halting selector; None = all):
            untaken patches neither have nor are partners.
        content: each view's ``[B, 1, H, W]`` content mask; pairs in which either
            patch is mostly padding are invalid (None: no padding check).
    """

    def match(a: int, b: int) -> Correspondence:
        if grid:
            found = grid_correspondence(centres[a], matrices[a], matrices[b], image_size, patch_size)
        else:
            other = centres[b] if masks[b] is None else centres[b].masked_fill(~masks[b][..., None], -1e6)  # untaken: never nearest
            found = nearest_correspondence(centres[a], matrices[a], matrices[b], other, image_size, patch_size)
        valid = found.valid
        if masks[a] is not None:
            valid = valid & masks[a]
        if content is not None:
            own = content_share(content[a], centres[a], patch_size) >= MIN_CONTENT
            theirs = content_share(content[b], centres[b], patch_size) >= MIN_CONTENT
            valid = valid & own & torch.gather(theirs, 1, found.partner)
        found.valid = valid
        found.partner = torch.where(valid, found.partner, torch.zeros_like(found.partner))
        return found

    return match(0, 1), match(1, 0)


def matches_of(views, patches, patch_embed) -> tuple[Correspondence, Correspondence]:
    """Partners between two views from the patches their forwards took (``ForwardAux.patches``: grid or
    selected centres, and the mask of a halting selector), the views' matrices and content masks."""
    first, second = patches[0], patches[1]
    return view_matches(
        (views.matrices[0], views.matrices[1]),
        (first.centres, second.centres),
        patch_embed.image_size,
        patch_embed.patch_size,
        grid=patch_embed.selector is None,
        masks=(first.mask, second.mask),
        content=(views.content[0], views.content[1]),
    )
