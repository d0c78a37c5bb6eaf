"""``entropy_maxsum``: N non-overlapping patches whose entropies sum to the most.

The notes: "it is different to select the top-k highest-entropy patches versus
the k patches that sum to the highest entropy (only if non-overlapping)", with a
pointer to the maximum-subarray problem. Choosing non-overlapping squares of
largest total weight is a maximum-weight independent set in a unit-square
graph (NP-hard in general), so two batched solvers run and each image keeps the
better of their two answers:

- **strip DP** (exact on its sub-problem): patches whose top rows lie on
  multiples of the patch size, i.e. in horizontal strips of height ``p``. Inside
  a strip the best ``n`` non-overlapping intervals for every ``n`` come from a
  dynamic programme along the row (the maximum-subarray recurrence with a count),
  and a max-plus knapsack splits ``N`` between the strips. It is the exact optimum
  whenever an optimal layout is strip-aligned — always when the image is one
  strip high (``image_size < 2 p``), and always when ``stride == p`` (the
  candidates are then the grid cells).
- **greedy non-maximum suppression** over all candidates: take the best
  remaining candidate, drop those overlapping it, ``N`` times. A patch overlaps
  at most 4 pairwise disjoint patches of its size, so greedy reaches at least
  1/4 of the optimum in the worst case.

Both loop over positions or picks, never over images. The measured gap to the
brute-force optimum on small random cases is in ``docs/patches.md``
(``benchmarks/patch_maxsum_gap.py``).

>>> import torch
>>> scores = torch.tensor([[[1.0, 3.0, 3.0, 1.0]]])   # one strip, 4 positions, patch = 2 positions wide
>>> strip_dp(scores, num=2, gap=2).tolist()           # 3 + 3 overlaps; 1 + 3 or 3 + 1 do not
[[0, 2]]
"""

from __future__ import annotations

import torch
from torch import Tensor

from ssroute.errors import ConfigError
from ssroute.patches.base import PATCH_SELECTORS, overlaps
from ssroute.patches.entropy import EntropySelector


def strip_dp(scores: Tensor, num: int, gap: int) -> Tensor:
    """Exact best ``num`` non-overlapping picks in strips: ``[B, strips, L] -> [B, num]`` flat ``strip * L + position`` indices.

    Two picks in one strip do not overlap when their positions differ by ``gap`` or more.
    """
    batch, strips, length = scores.shape
    neg = torch.finfo(scores.dtype).min / 4
    # best[b, s, i + 1, n + 1]: best sum of n picks among positions <= i of strip s (column 0: n = -1, impossible)
    best = scores.new_full((batch, strips, length + 1, num + 2), neg)
    best[:, :, 0, 1] = 0.0
    take = torch.zeros(batch, strips, length, num + 1, dtype=torch.bool, device=scores.device)
    for i in range(length):
        taken = best[:, :, max(i + 1 - gap, 0), :-1] + scores[:, :, i, None]  # a pick at i after the last compatible row
        take[:, :, i] = taken > best[:, :, i, 1:]
        torch.maximum(best[:, :, i, 1:], taken, out=best[:, :, i + 1, 1:])
    curve = best[:, :, -1, 1:]  # [B, strips, num + 1]
    # max-plus knapsack over strips: total[n] = max_m total_before[m] + curve_s[n - m]
    total, splits = curve[:, 0], []
    n_idx = torch.arange(num + 1, device=scores.device)
    m_le_n = n_idx[None, :] <= n_idx[:, None]  # [n, m]
    for s in range(1, strips):
        shifted = (
            curve[:, s]
            .gather(1, (n_idx[:, None] - n_idx[None, :]).clamp(min=0).flatten()[None].expand(batch, -1))
            .view(batch, num + 1, num + 1)
        )
        combined = torch.where(m_le_n, total[:, None, :] + shifted, neg)  # [B, n, m]
        total, split = combined.max(dim=-1)
        splits.append(split)
    count = torch.zeros(batch, strips, dtype=torch.long, device=scores.device)
    left = torch.full((batch,), num, dtype=torch.long, device=scores.device)
    for s in range(strips - 1, 0, -1):
        before = splits[s - 1].gather(1, left[:, None]).squeeze(1)
        count[:, s], left = left - before, before
    count[:, 0] = left
    # walk each strip backwards, taking position i when the table says so (no loop over images or strips)
    chosen = torch.zeros(batch, strips, length, dtype=torch.bool, device=scores.device)
    limit = torch.full((batch, strips), length - 1, dtype=torch.long, device=scores.device)
    for i in range(length - 1, -1, -1):
        took = (i <= limit) & (count > 0) & take[:, :, i].gather(2, count[..., None]).squeeze(2)
        chosen[:, :, i] = took
        count = count - took.long()
        limit = torch.where(took, i - gap, limit)
    return chosen.flatten(1).float().argsort(dim=1, descending=True, stable=True)[:, :num]


def greedy_nms(scores: Tensor, candidates: Tensor, num: int, patch_size: int) -> tuple[Tensor, Tensor]:
    """Greedy non-overlapping picks: ``[B, K], [K, 2] -> (indices [B, num], found [B, num])``.

    ``found`` is False where every remaining candidate overlapped an earlier pick.
    """
    neg = torch.finfo(scores.dtype).min
    clash = overlaps(candidates, candidates, patch_size)  # [K, K]
    remaining = scores.clone()
    picks, found = [], []
    for _ in range(num):
        value, best = remaining.max(dim=1)
        picks.append(best)
        found.append(value > neg)
        remaining.masked_fill_(clash[best], neg)
    return torch.stack(picks, dim=1), torch.stack(found, dim=1)


@PATCH_SELECTORS.register("entropy_maxsum")
class EntropyMaxSum(EntropySelector):
    """``num_patches`` non-overlapping candidates of largest summed entropy, most informative first (see module doc)."""

    def __init__(
        self, patch_size: int, image_size: int, num_patches: int, stride: int = 1, entropy_window: int | None = None, entropy_bins: int = 16
    ) -> None:
        super().__init__(patch_size, image_size, num_patches, stride, entropy_window, entropy_bins)
        self.side = (image_size - patch_size) // self.stride + 1  # candidates per lattice row
        self.gap = patch_size // self.stride  # lattice steps between non-overlapping neighbours
        self.strips = image_size // patch_size
        capacity = self.strips * ((self.side - 1) // self.gap + 1)
        if num_patches > capacity:
            raise ConfigError(
                f"patches.num_patches={num_patches} non-overlapping patches of side {patch_size} do not fit a {image_size}-pixel image; use at most {capacity}."
            )

    @torch.no_grad()
    def select(self, scores: Tensor) -> Tensor:
        """``[B, candidates]`` scores -> ``[B, N]`` candidate indices, non-overlapping, by descending score."""
        lattice = scores.view(-1, self.side, self.side)
        strip_rows = torch.arange(self.strips, device=scores.device) * self.gap
        in_strips = strip_dp(lattice[:, strip_rows], self.num_patches, self.gap)  # indices into [strips, side]
        from_dp = strip_rows[in_strips // self.side] * self.side + in_strips % self.side
        from_greedy, found = greedy_nms(scores, self.candidates, self.num_patches, self.patch_size)
        greedy_sum = torch.where(found, scores.gather(1, from_greedy), float("-inf")).sum(dim=1)
        use_greedy = greedy_sum > scores.gather(1, from_dp).sum(dim=1)
        picked = torch.where(use_greedy[:, None], from_greedy, from_dp)
        order = scores.gather(1, picked).argsort(dim=1, descending=True, stable=True)
        return picked.gather(1, order)

    def forward(self, images: Tensor) -> Tensor:
        return self.candidates[self.select(self.scores(images))]
