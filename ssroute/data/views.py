"""Augmented views of a batch, made on the batch's device with kornia.

Geometric augmentations (random resized crop, flip, rotation) run first in one
``AugmentationSequential`` so their composed 3x3 matrix maps pixel coordinates
of the original image to the view (``views.matrices [batch, 3, 3]``); photometric
ones (colour jitter, grey, blur, noise) follow and move no pixel. Self-supervised
routing uses the matrices to find which patches of two views show the same
place (``ssroute.data.correspondence``). The geometric warp also carries an
all-ones channel, so each view comes with its content mask ``[batch, 1, H, W]``
(1 where the view shows the image, 0 in the padding a rotation brings in).

>>> import torch
>>> from ssroute.config import AugmentConfig
>>> augment = ViewAugment(AugmentConfig(), channels=1, image_size=8, mean=(0.3,), std=(0.4,))
>>> views = augment(torch.randint(0, 255, (4, 1, 8, 8), dtype=torch.uint8), num_views=2)
>>> [tuple(v.shape) for v in views.images], tuple(views.matrices[0].shape)
([(4, 1, 8, 8), (4, 1, 8, 8)], (4, 3, 3))
"""

from __future__ import annotations

from dataclasses import dataclass

import kornia.augmentation as K
import torch
from torch import nn


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (or [0, 1] float) images ``[B, C, H, W]`` -> ``(x - mean) / std`` with per-channel ``mean``/``std``
    broadcastable to ``[1, C, 1, 1]``: the one normalisation of model inputs."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images
    return (x - mean) / std


@dataclass
class Views:
    images: list[torch.Tensor]  # num_views x [batch, channels, height, width], normalised
    matrices: list[torch.Tensor]  # num_views x [batch, 3, 3], original pixel -> view pixel
    content: list[torch.Tensor]  # num_views x [batch, 1, height, width], share of each pixel that is image (not padding)


class ViewAugment(nn.Module):
    """Make ``num_views`` independently augmented, normalised views of a uint8 batch.

    Args:
        cfg: an :class:`ssroute.config.AugmentConfig`.
        channels: image channels (colour jitter's saturation/hue and greying need 3).
        image_size: square image side; views keep it.
        mean: per-channel mean used for normalisation.
        std: per-channel std used for normalisation.
    """

    def __init__(self, cfg, channels: int, image_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        size = (image_size, image_size)
        geometric: list[nn.Module] = [K.RandomResizedCrop(size, scale=tuple(cfg.crop_scale), ratio=tuple(cfg.crop_ratio))]
        if cfg.hflip > 0:
            geometric.append(K.RandomHorizontalFlip(p=cfg.hflip))
        if cfg.rotation > 0:
            geometric.append(K.RandomRotation(degrees=cfg.rotation, p=1.0))
        self.geometric = K.AugmentationSequential(*geometric)
        photometric: list[nn.Module] = []
        if cfg.color_jitter > 0:
            s = cfg.color_jitter
            colour = (s, s, s, min(0.1, s / 4)) if channels == 3 else (s, s, 0.0, 0.0)
            photometric.append(K.ColorJiggle(*colour, p=cfg.color_jitter_p))
        if cfg.grayscale > 0 and channels == 3:
            photometric.append(K.RandomGrayscale(p=cfg.grayscale))
        if cfg.blur > 0:
            kernel = 3 if image_size < 32 else 2 * (image_size // 20) + 1
            photometric.append(K.RandomGaussianBlur((kernel, kernel), (0.1, 2.0), p=cfg.blur))
        self.photometric = nn.Sequential(*photometric)
        self.noise = cfg.noise
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 or [0,1] float images -> normalised float images (no augmentation)."""
        return normalize(images, self.mean, self.std)

    def view(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One augmented view, its ``[batch, 3, 3]`` original->view pixel matrix and its ``[batch, 1, H, W]`` content mask."""
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images  # augment in [0, 1], normalise last
        channels = x.shape[1]
        warped = self.geometric(torch.cat([x, torch.ones_like(x[:, :1])], dim=1))  # one warp for the view and its mask
        x, content = warped[:, :channels], warped[:, channels:]
        matrix = self.geometric.transform_matrix
        x = self.photometric(x).clamp(0.0, 1.0)
        if self.noise > 0:
            x = x + self.noise * torch.randn_like(x)
        return normalize(x, self.mean, self.std), matrix, content

    def forward(self, images: torch.Tensor, num_views: int = 2) -> Views:
        made = [self.view(images) for _ in range(num_views)]
        return Views([v[0] for v in made], [v[1] for v in made], [v[2] for v in made])
