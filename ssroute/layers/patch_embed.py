"""Patch embedding with positions computed from continuous patch centres.

Images ``[batch, channels, height, width]`` -> tokens ``[batch, tokens, dim]``
plus patch centres ``[batch, tokens, 2]`` as (x, y) in pixels. With
``position="absolute"`` positions enter the tokens through a fixed 2-D
sine-cosine code of the centre (as in MAE, He et al. 2021); with
``position="rope"`` the tokens carry content only and attention rotates queries
and keys by the centres (``ssroute.layers.rope``). Either way a patch taken
anywhere in the image — not only on the grid — gets a valid position, and the
centres are what view correspondences are computed from.

The stem is one ``patch x patch`` convolution (``stem="patch"``, ViT's), or a
small convolutional stem (``stem="conv"``: 3x3 / 4x4 convolutions with batch
norm and ReLU down to the patch grid, then a 1x1 projection — Xiao et al. 2021,
"Early convolutions help transformers see better", arXiv 2106.14881), whose
overlapping receptive fields suit small images. Its kernels are laid out so
that output cell ``i`` is centred on the grid centre ``i * patch + (patch - 1) / 2``.

>>> import torch
>>> embed = PatchEmbed(channels=1, patch_size=2, dim=32, image_size=8)
>>> tokens, centres = embed(torch.randn(3, 1, 8, 8))
>>> tuple(tokens.shape), tuple(centres.shape), centres[0, 0].tolist()
((3, 16, 32), (3, 16, 2), [0.5, 0.5])

With a patch selector (``ssroute.patches``) the same weights embed ``N`` patches
cut out anywhere: the convolution kernel is applied as a linear map to the
pixels gathered at the selector's centres, and the position code is computed
from those centres. Without one (the grid) nothing changes.
"""

from __future__ import annotations

import torch
from torch import nn

from ssroute.data.correspondence import extract_patches
from ssroute.errors import ConfigError
from ssroute.patches.base import Patches, PatchSelector


def check_patch_size(patch_size: int, image_size: int, what: str | None = None, data: str | None = None) -> None:
    """The one patch-size check: ``patch_size`` must divide ``image_size`` (a ConfigError listing the divisors)."""
    if patch_size < 1 or image_size % patch_size:
        divisors = [p for p in range(1, image_size + 1) if image_size % p == 0]
        where = f"the {data} image size" if data else "the image size"
        raise ConfigError(f"{what or f'model.patch_size={patch_size}'} does not divide {where} {image_size}; choose one of {divisors}.")


def sincos_position(centres: torch.Tensor, dim: int, scale: float) -> torch.Tensor:
    """``[..., 2]`` pixel centres -> ``[..., dim]`` sine-cosine codes (half for x, half for y)."""
    quarter = dim // 4
    freqs = torch.exp(-torch.arange(quarter, device=centres.device, dtype=torch.float32) * (9.21 / max(quarter, 1)))
    angles = (centres.float() / scale)[..., None] * freqs * 100.0  # [..., 2, quarter]
    code = torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)  # [..., 4*quarter]
    return nn.functional.pad(code, (0, dim - code.shape[-1]))


def grid_centres(image_size: int, patch_size: int, device: torch.device | None = None) -> torch.Tensor:
    """``[tokens, 2]`` (x, y) pixel centres of the row-major patch grid."""
    side = torch.arange(image_size // patch_size, device=device, dtype=torch.float32) * patch_size + (patch_size - 1) / 2
    ys, xs = torch.meshgrid(side, side, indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], dim=-1)


POSITIONS = ("absolute", "rope")
STEMS = ("patch", "conv")


def conv_stem(channels: int, patch_size: int, dim: int) -> nn.Sequential:
    """``[B, C, H, W] -> [B, dim, H / patch, W / patch]``: convolutions with batch norm and ReLU, then a 1x1 projection.

    A power-of-two patch is reached by 4x4 stride-2 convolutions (padding 1: centred on the grid); any other
    patch by one ``patch x patch`` convolution of that stride. A 3x3 convolution leads when fewer than two
    downsampling convolutions would run. Widths ``dim / 4`` then ``dim / 2``.
    """
    halvings = patch_size.bit_length() - 1 if patch_size & (patch_size - 1) == 0 else 0
    down = [(4, 2, 1)] * halvings if halvings else ([(patch_size, patch_size, 0)] if patch_size > 1 else [])
    convs = [(3, 1, 1)] * max(0, 2 - len(down)) + down
    widths = [max(8, dim // 4), max(8, dim // 2)] + [max(8, dim // 2)] * max(0, len(convs) - 2)
    layers: list[nn.Module] = []
    width_in = channels
    for (kernel, stride, padding), width in zip(convs, widths, strict=False):
        layers += [nn.Conv2d(width_in, width, kernel, stride, padding, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        width_in = width
    layers.append(nn.Conv2d(width_in, dim, kernel_size=1))
    return nn.Sequential(*layers)


class PatchEmbed(nn.Module):
    """Square patches, a learned stem, and (``position="absolute"``) a position code.

    Args:
        channels: input channels.
        patch_size: patch side in pixels; must divide ``image_size``.
        dim: token width.
        image_size: square image side in pixels.
        selector: which patches to embed (``ssroute.patches``); None = the non-overlapping grid.
        position: ``absolute`` adds the sine-cosine code of each centre to its token; ``rope`` leaves
            tokens position-free (attention applies :class:`~ssroute.layers.rope.AxialRope`).
        stem: ``patch`` (one patch-sized convolution) or ``conv`` (:func:`conv_stem`).
        position_dims: coordinates of a ``position_width``-wide position code this embedding keeps
            (a model pruned over its hidden dimension, ``ssroute.prune``); None = the ``dim``-wide code.
        position_width: width of the code ``position_dims`` index; None = ``dim``.
    """

    def __init__(
        self,
        channels: int,
        patch_size: int,
        dim: int,
        image_size: int,
        selector: PatchSelector | None = None,
        position: str = "absolute",
        stem: str = "patch",
        position_dims: list[int] | None = None,
        position_width: int | None = None,
    ) -> None:
        super().__init__()
        check_patch_size(patch_size, image_size)
        if position not in POSITIONS:
            raise ConfigError(f"model.position={position!r} is unknown; choose one of {list(POSITIONS)}.")
        if stem not in STEMS:
            raise ConfigError(f"model.stem={stem!r} is unknown; choose one of {list(STEMS)}.")
        if position_dims is not None and len(position_dims) != dim:
            raise ConfigError(f"model.shape.position_dims lists {len(position_dims)} coordinates for model.dim={dim}; give one per token dimension.")
        self.position_dims = None if position_dims is None else torch.tensor(list(position_dims), dtype=torch.long)
        self.position_width = dim if position_width is None else position_width
        self.patch_size, self.image_size = patch_size, image_size
        self.proj = nn.Conv2d(channels, dim, kernel_size=patch_size, stride=patch_size) if stem == "patch" else conv_stem(channels, patch_size, dim)
        self.register_buffer("centres", grid_centres(image_size, patch_size), persistent=False)
        self.register_buffer("position", self.position_code(self.centres), persistent=False)
        self.selector = selector
        self.dim = dim
        self.absolute = position == "absolute"

    @property
    def num_tokens(self) -> int:
        """Tokens per image (the most an image may take, for a halting selector)."""
        return self.selector.num_patches if self.selector is not None else (self.image_size // self.patch_size) ** 2

    def embed(self, images: torch.Tensor) -> Patches:
        """Tokens, centres and (for a halting selector) mask, pool weights and ponder cost of a batch."""
        if self.selector is None:
            tokens = self.proj(images).flatten(2).transpose(1, 2)
            if self.absolute:
                tokens = tokens + self.position
            patches = Patches(tokens, self.centres.expand(images.shape[0], -1, -1))
        else:
            with torch.no_grad():
                centres = self.selector(images)
            tokens = self.embed_at(images, centres)
            if self.absolute:
                tokens = tokens + self.position_code(centres).to(tokens.dtype)
            patches = Patches(tokens, centres)
            if self.selector.halts:
                patches.mask, patches.pool_weights, patches.aux_loss = self.selector.halt(tokens)
        return patches

    def position_code(self, centres: torch.Tensor) -> torch.Tensor:
        """``[..., 2]`` pixel centres -> ``[..., dim]`` position codes (the kept coordinates of a pruned model's)."""
        code = sincos_position(centres, self.position_width, self.image_size)
        return code if self.position_dims is None else code[..., self.position_dims.to(code.device)]

    def embed_at(self, images: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        """Tokens ``[B, N, dim]`` of the patches at continuous ``centres [B, N, 2]`` (no position code).

        The patch stem's kernel applies as a linear map to the pixels cut out at the centres; the
        convolutional stem's feature map is sampled bilinearly at them (exact at grid centres).
        """
        if isinstance(self.proj, nn.Conv2d):
            pixels = extract_patches(images, centres, self.patch_size)  # [B, N, C*p*p]
            return nn.functional.linear(pixels, self.proj.weight.flatten(1), self.proj.bias)
        features = self.proj(images)  # [B, dim, S, S], cell i centred on pixel i * p + (p - 1) / 2
        cells = (centres - (self.patch_size - 1) / 2) / self.patch_size
        side = features.shape[-1]
        grid = (2 * cells + 1) / side - 1  # align_corners=False: cell i sits at (2 i + 1) / side - 1
        sampled = nn.functional.grid_sample(features, grid.unsqueeze(1).to(features.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)
        return sampled.squeeze(2).transpose(1, 2)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        patches = self.embed(images)
        return patches.tokens, patches.centres
