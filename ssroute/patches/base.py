"""Patch selection: which ``N`` patches of each image become tokens, anywhere in the image.

A selector looks at a batch of images and returns continuous patch centres
``[batch, N, 2]`` as (x, y) in pixels — the convention of
``ssroute.layers.patch_embed`` (pixel ``(x, y)`` covers ``[x-0.5, x+0.5)``, the
top-left patch of side ``p`` has centre ``((p-1)/2, (p-1)/2)``). The patch
embedding then cuts the patches out with one ``grid_sample`` (bilinear, so any
real centre works; at integer pixel offsets it copies pixels exactly) and encodes
their positions from the centres, so a selected patch is a token like a grid one.

Selection is non-differentiable (it runs without autograd); only the halting
head of :mod:`ssroute.patches.sequential` learns. Candidates of the
entropy selectors are the patches whose top-left corner lies on a ``stride``
lattice: ``[candidates, 2]`` centres in row-major order.

>>> candidate_centres(image_size=6, patch_size=4, stride=1).tolist()
[[1.5, 1.5], [2.5, 1.5], [3.5, 1.5], [1.5, 2.5], [2.5, 2.5], [3.5, 2.5], [1.5, 3.5], [2.5, 3.5], [3.5, 3.5]]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ssroute.errors import ConfigError
from ssroute.registry import Registry

PATCH_SELECTORS: Registry = Registry("patch selector")


@dataclass
class Patches:
    """What one forward of the patch embedding produced."""

    tokens: Tensor  # [batch, N, dim] embedded patches with their position codes
    centres: Tensor  # [batch, N, 2] (x, y) pixel centres in the view
    mask: Tensor | None = None  # [batch, N] True for patches taken; None = all taken
    pool_weights: Tensor | None = None  # [batch, N] weights of the mean pool (sum to 1); None = uniform
    aux_loss: Tensor | None = None  # scalar auxiliary loss of the selection (ponder cost); None = none


class PatchSelector(nn.Module):
    """Base class: ``forward(images [batch, C, H, W]) -> centres [batch, N, 2]``.

    Args:
        patch_size: patch side in pixels (the model's).
        image_size: square image side in pixels.
        num_patches: patches per image.
    """

    halts = False  # True when the selector also decides how many of its patches to keep (sequential)

    def __init__(self, patch_size: int, image_size: int, num_patches: int) -> None:
        super().__init__()
        if not 0 < patch_size <= image_size:
            raise ConfigError(f"model.patch_size={patch_size} must be between 1 and the image size {image_size}.")
        if num_patches < 1:
            raise ConfigError(f"patches.num_patches={num_patches} must be a positive integer (or null for the grid's count).")
        self.patch_size, self.image_size, self.num_patches = patch_size, image_size, num_patches

    def forward(self, images: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def candidate_centres(image_size: int, patch_size: int, stride: int, device: torch.device | None = None) -> Tensor:
    """``[candidates, 2]`` centres of every patch whose top-left corner is on the ``stride`` lattice (row-major)."""
    side = torch.arange(0, image_size - patch_size + 1, stride, device=device, dtype=torch.float32) + (patch_size - 1) / 2
    ys, xs = torch.meshgrid(side, side, indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], dim=-1)


def overlaps(centres_a: Tensor, centres_b: Tensor, patch_size: int) -> Tensor:
    """``[..., A, 2], [..., B, 2] -> [..., A, B]``: the two square patches share a pixel area."""
    gap = (centres_a[..., :, None, :] - centres_b[..., None, :, :]).abs()
    return (gap < patch_size - 1e-6).all(dim=-1)
