"""Local intensity entropy of candidate patches, and the ``entropy_topk`` selector.

The research notes ask whether entropy stands in for how much a patch is worth
("correlate patch value with entropy?"). A candidate's score is the Shannon
entropy (nats) of the histogram of its pixel intensities: luminance for colour
images, quantised into ``bins`` equal bins over each image's own range (so the
score ignores the dataset normalisation). A flat patch scores 0; a patch using
all bins evenly scores ``log(bins)``.

The histograms of all candidates of the whole batch come from one one-hot map
``[batch, bins, H, W]`` and one ``avg_pool2d`` (kernel = window, step = stride):
no loop over images or candidates. A window larger than the patch is centred on
it (``window - patch_size`` must be even).

``entropy_topk`` keeps the ``N`` highest-scoring candidates; they may overlap
(compare ``entropy_maxsum``, :mod:`ssroute.patches.maxsum`).

>>> import torch
>>> image = torch.zeros(1, 1, 8, 8)
>>> image[0, 0, 4:, 4:] = torch.rand(4, 4) + 1   # a noisy square in the bottom-right corner
>>> EntropyTopK(patch_size=4, image_size=8, num_patches=1, stride=4)(image).tolist()
[[[5.5, 5.5]]]
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ssroute.errors import ConfigError
from ssroute.patches.base import PATCH_SELECTORS, PatchSelector, candidate_centres

LUMINANCE = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights of R, G, B


def luminance(images: Tensor) -> Tensor:
    """``[B, C, H, W] -> [B, 1, H, W]``: BT.601 luminance for 3 channels, the channel mean otherwise."""
    if images.shape[1] == 3:
        return (images * images.new_tensor(LUMINANCE).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
    return images.mean(dim=1, keepdim=True)


def local_entropy(images: Tensor, patch_size: int, stride: int = 1, window: int | None = None, bins: int = 16) -> Tensor:
    """Histogram entropy of every candidate patch: ``[B, C, H, W] -> [B, rows, cols]`` on the ``stride`` lattice.

    ``[b, i, j]`` scores the patch with top-left corner ``(x, y) = (j * stride, i * stride)``,
    whose centre is ``candidate_centres(...)[i * cols + j]``.
    """
    window = window or patch_size
    grey = luminance(images.float())
    low = grey.amin(dim=(2, 3), keepdim=True)
    high = grey.amax(dim=(2, 3), keepdim=True)
    level = ((grey - low) / (high - low).clamp_min(1e-8) * bins).long().clamp_(0, bins - 1)  # [B, 1, H, W]
    onehot = torch.zeros(grey.shape[0], bins, *grey.shape[2:], device=images.device).scatter_(1, level, 1.0)
    # count_include_pad=False: a window reaching past the border counts only its pixels inside the image
    freq = F.avg_pool2d(onehot, window, stride, padding=(window - patch_size) // 2, count_include_pad=False)
    return -torch.special.xlogy(freq, freq).sum(dim=1)


def check_window(patch_size: int, window: int | None, stride: int) -> None:
    """ConfigError unless the entropy window and the candidate stride fit the patch size."""
    if stride < 1 or patch_size % stride:
        raise ConfigError(f"patches.stride={stride} must divide model.patch_size={patch_size}; use 1 (every pixel) or a divisor of it.")
    if window is not None and (window < patch_size or (window - patch_size) % 2):
        raise ConfigError(
            f"patches.entropy_window={window} must be at least model.patch_size={patch_size} and differ from it by an even number, so it centres on the patch; use null for the patch itself."
        )


class EntropySelector(PatchSelector):
    """Shared setup of the entropy selectors: the candidate lattice and the scoring options.

    Args:
        patch_size: patch side in pixels.
        image_size: square image side in pixels.
        num_patches: patches per image.
        stride: step in pixels between candidate top-left corners; must divide ``patch_size``.
        entropy_window: side of the scored window (``None`` = the patch itself).
        entropy_bins: histogram bins.
    """

    def __init__(
        self, patch_size: int, image_size: int, num_patches: int, stride: int = 1, entropy_window: int | None = None, entropy_bins: int = 16
    ) -> None:
        super().__init__(patch_size, image_size, num_patches)
        check_window(patch_size, entropy_window, stride)
        if entropy_bins < 2:
            raise ConfigError(f"patches.entropy_bins={entropy_bins} must be at least 2.")
        self.stride, self.window, self.bins = stride, entropy_window, entropy_bins
        self.register_buffer("candidates", candidate_centres(image_size, patch_size, stride), persistent=False)
        if num_patches > len(self.candidates):
            raise ConfigError(
                f"patches.num_patches={num_patches} exceeds the {len(self.candidates)} candidate patches; lower it or patches.stride."
            )

    def scores(self, images: Tensor) -> Tensor:
        """``[B, candidates]`` entropies in candidate order."""
        return local_entropy(images, self.patch_size, self.stride, self.window, self.bins).flatten(1)

    @property
    def max_entropy(self) -> float:
        return math.log(self.bins)


@PATCH_SELECTORS.register("entropy_topk")
class EntropyTopK(EntropySelector):
    """The ``num_patches`` candidates of highest entropy, overlaps allowed, most informative first."""

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        best = self.scores(images).topk(self.num_patches, dim=1).indices  # [B, N], descending
        return self.candidates[best]
