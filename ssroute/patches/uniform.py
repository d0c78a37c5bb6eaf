"""Entropy-free selectors: ``grid`` (an even lattice of ``N`` patches) and ``random`` (``N`` centres anywhere).

``grid`` with the grid's own count (``patches.num_patches=null``) is the patch
embedding's convolution, unchanged; with another ``N`` (a square number) it is a
``sqrt(N) x sqrt(N)`` lattice of patches of the model's size spread evenly over
the image — fewer tokens of the same size, with gaps between them (or overlaps
when ``N`` exceeds the grid's count). ``random`` draws every centre uniformly
over the positions where the whole patch lies inside the image, from the global
generator that training re-seeds each step (so resumes repeat it); in eval mode
from a generator seeded with 0, so evaluation does not depend on the RNG state.

>>> LatticeGrid(patch_size=4, image_size=28, num_patches=25)(torch.zeros(2, 1, 28, 28))[0, :5, 0].tolist()
[1.5, 7.5, 13.5, 19.5, 25.5]
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ssroute.errors import ConfigError
from ssroute.patches.base import PATCH_SELECTORS, PatchSelector


@PATCH_SELECTORS.register("grid")
class LatticeGrid(PatchSelector):
    """``sqrt(N) x sqrt(N)`` patches evenly spaced from corner to corner, row-major."""

    def __init__(self, patch_size: int, image_size: int, num_patches: int) -> None:
        super().__init__(patch_size, image_size, num_patches)
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise ConfigError(
                f"patches=grid needs a square patches.num_patches (e.g. {side * side} or {(side + 1) ** 2}), got {num_patches}."
            )
        first, last = (patch_size - 1) / 2, image_size - 1 - (patch_size - 1) / 2
        line = torch.linspace(first, last, side) if side > 1 else torch.tensor([(image_size - 1) / 2])
        ys, xs = torch.meshgrid(line, line, indexing="ij")
        self.register_buffer("centres", torch.stack([xs.flatten(), ys.flatten()], dim=-1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        return self.centres.expand(images.shape[0], -1, -1)


@PATCH_SELECTORS.register("random")
class RandomPatches(PatchSelector):
    """``N`` centres uniform over ``[(p-1)/2, size-1-(p-1)/2]^2`` (continuous; overlaps allowed)."""

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        low = (self.patch_size - 1) / 2
        span = self.image_size - self.patch_size
        # evaluation draws from a fixed generator, so features (kNN, probes) do not depend on the RNG state
        generator = None if self.training else torch.Generator(images.device).manual_seed(0)
        return low + span * torch.rand(images.shape[0], self.num_patches, 2, device=images.device, generator=generator)
