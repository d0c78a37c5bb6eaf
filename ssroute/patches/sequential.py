"""``sequential``: patches taken one at a time, most informative first, until a learned halting score says enough.

The notes: "grab one patch at a time, sample another if needed". Candidates are
the ``entropy_maxsum`` patches in order of decreasing entropy. After each patch
``t`` a small head (LayerNorm + linear) reads the running mean of the embedded
tokens so far and gives a halting probability ``h_t``; as in adaptive
computation time (Graves 2016, arXiv 1603.08983) the image stops at the first
``n`` with ``h_1 + ... + h_n >= 1 - halt_epsilon`` (or at ``num_patches``). The
patches after ``n`` are masked: attention ignores them and pooling gives them
weight 0.

The halting distribution over prefix lengths (``a_t = h_t`` for ``t < n``, the
remainder ``R = 1 - h_1 - ... - h_{n-1}`` at ``n``) weights the mean pool: token
``j`` gets ``sum_{t >= j} a_t / t``, the expected weight of the mean over a prefix
of random length ``t ~ a``. That is how the SSL loss reaches the head (the
blocks see all ``n`` kept tokens at once, an approximation of running each
prefix separately). The ponder cost ``ponder_weight * mean(n + R) / num_patches``
is the selection's auxiliary loss and pushes towards fewer patches.

>>> import torch
>>> selector = SequentialPatches(patch_size=2, image_size=8, num_patches=4, dim=16, halt_epsilon=0.05)
>>> mask, weights, ponder = selector.halt(torch.randn(3, 4, 16))
>>> mask.shape, bool(torch.allclose(weights.sum(dim=1), torch.ones(3))), ponder.shape
(torch.Size([3, 4]), True, torch.Size([]))
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ssroute.errors import ConfigError
from ssroute.patches.base import PATCH_SELECTORS
from ssroute.patches.maxsum import EntropyMaxSum


@PATCH_SELECTORS.register("sequential")
class SequentialPatches(EntropyMaxSum):
    """Entropy-ordered non-overlapping patches with ACT halting.

    Args:
        patch_size: patch side in pixels.
        image_size: square image side in pixels.
        num_patches: the most patches an image may take.
        dim: token width (the halting head's input).
        halt_epsilon: stop once the cumulative halting score reaches ``1 - halt_epsilon``.
        ponder_weight: weight of the ponder cost.
        stride: step in pixels between candidate top-left corners.
        entropy_window: side of the scored window (``None`` = the patch).
        entropy_bins: histogram bins.
    """

    halts = True

    def __init__(
        self,
        patch_size: int,
        image_size: int,
        num_patches: int,
        dim: int,
        halt_epsilon: float = 0.01,
        ponder_weight: float = 0.01,
        stride: int = 1,
        entropy_window: int | None = None,
        entropy_bins: int = 16,
    ) -> None:
        super().__init__(patch_size, image_size, num_patches, stride=stride, entropy_window=entropy_window, entropy_bins=entropy_bins)
        if not 0.0 < halt_epsilon < 1.0:
            raise ConfigError(f"patches.halt_epsilon={halt_epsilon} must be in (0, 1); 0.01 is the usual ACT value.")
        if ponder_weight < 0:
            raise ConfigError(f"patches.ponder_weight={ponder_weight} must be >= 0.")
        self.halt_epsilon, self.ponder_weight = halt_epsilon, ponder_weight
        self.halt_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 1))
        nn.init.zeros_(self.halt_head[1].weight)
        # h_t = 1 / N at the start: an image first takes (nearly) all its patches, the ponder cost then trims
        nn.init.constant_(self.halt_head[1].bias, -math.log(max(num_patches - 1, 1)))

    def halt(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``[B, N, dim]`` tokens in selection order -> (mask ``[B, N]``, pool weights ``[B, N]``, ponder cost ``[]``)."""
        steps = torch.arange(1, tokens.shape[1] + 1, device=tokens.device)
        running = tokens.cumsum(dim=1) / steps[:, None]  # pooled state after each patch
        h = torch.sigmoid(self.halt_head(running).squeeze(-1).float())  # [B, N]
        total = h.cumsum(dim=1)
        reached = total >= 1.0 - self.halt_epsilon
        reached[:, -1] = True
        last = reached.float().argmax(dim=1)  # first step that reaches the threshold (0-based)
        position = steps - 1
        mask = position[None] <= last[:, None]
        remainder = 1.0 - (total - h).gather(1, last[:, None]).squeeze(1)
        act = torch.where(position[None] < last[:, None], h, 0.0) + torch.where(position[None] == last[:, None], remainder[:, None], 0.0)
        weights = (act / steps).flip(1).cumsum(dim=1).flip(1)  # token j: sum over prefixes t >= j of a_t / t
        ponder = self.ponder_weight * ((last + 1).float() + remainder).mean() / tokens.shape[1]
        return mask, weights.to(tokens.dtype), ponder
