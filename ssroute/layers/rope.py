"""Axial 2-D rotary position embedding from continuous patch centres (RoPE).

Rotary embeddings (Su et al. 2021, arXiv 2104.09864) rotate queries and keys
by angles proportional to their positions, so an attention score depends on
the *offset* between two tokens and never on where they are; axial 2-D RoPE for
vision transformers (Heo et al. 2024, arXiv 2403.13298) rotates half of each
head's channels by the x coordinate and half by the y coordinate. Positions
never enter the token values: a token's content is carried by the residual
stream and its position only by how attention mixes it with its neighbours, so
the tokens a router sees are translation-equivariant — moving the image by one
patch moves every token with it. An absolute position code added to the tokens
(``model.position=absolute``) instead lets a router partition the patch grid.

Centres are pixel coordinates ``[batch, tokens, 2]`` (x, y), measured in patch
sides, so grid and selected patches (``ssroute.patches``) share one code.
Shapes: queries and keys ``[batch, heads, tokens, head_dim]``; the rotation
``(cos, sin)`` is ``[batch, 1, tokens, head_dim]``.

>>> import torch
>>> rope = AxialRope(head_dim=8, patch_size=2)
>>> centres = torch.tensor([[[0.5, 0.5], [2.5, 0.5], [4.5, 2.5]]])
>>> q, k = torch.randn(1, 1, 3, 8), torch.randn(1, 1, 3, 8)
>>> rotation = rope(centres)
>>> moved = rope(centres + torch.tensor([6.0, -2.0]))  # every token moved by the same offset
>>> scores = rotate(q, *rotation) @ rotate(k, *rotation).transpose(-1, -2)
>>> bool(torch.allclose(scores, rotate(q, *moved) @ rotate(k, *moved).transpose(-1, -2), atol=1e-5))
True
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ssroute.errors import ConfigError


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs ``(i, i + d/2)`` of ``x [..., tokens, d]`` by the angles behind ``cos``/``sin``."""
    half = x.shape[-1] // 2
    turned = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + turned * sin


class AxialRope(nn.Module):
    """Patch centres -> the ``(cos, sin)`` rotation of every head's queries and keys.

    Args:
        head_dim: channels per attention head; a multiple of 4 (two rotated pairs per axis at least).
        patch_size: patch side in pixels; positions are measured in patch sides.
        base: the longest wavelength, in patch sides, is ``2 pi base`` (RoPE-ViT's axial ``theta``: 100).
    """

    def __init__(self, head_dim: int, patch_size: int, base: float = 100.0) -> None:
        super().__init__()
        if head_dim % 4:
            raise ConfigError(
                f"model.position=rope needs a head width (model.dim / model.heads = {head_dim}) divisible by 4; change model.dim or model.heads."
            )
        quarter = head_dim // 4
        self.register_buffer("freqs", base ** (-torch.arange(quarter, dtype=torch.float32) / quarter), persistent=False)
        self.patch_size = patch_size

    def forward(self, centres: Tensor) -> tuple[Tensor, Tensor]:
        position = centres.float() / self.patch_size  # [B, N, 2] in patch sides
        angles = (position[..., None] * self.freqs).flatten(-2)  # [B, N, 2 * quarter]: the x angles, then the y angles
        angles = torch.cat([angles, angles], dim=-1).unsqueeze(1)  # [B, 1, N, head_dim]: pairs (i, i + d/2) share an angle
        return angles.cos(), angles.sin()
