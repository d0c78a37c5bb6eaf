"""Statistics of routing over depth: the layer-order matrix, identity usage and blocks applied per image.

The notes ask "are identity layers used? When?" and for the order in which
layers are deployed ("mat layer/T"). :class:`DepthStats` accumulates, over
forwards of a :class:`~ssroute.models.depth_router.DepthRoutedStack`, the
layer-order matrix ``order [steps, blocks + identities]`` (how many images
picked each choice at each step; halted images pick nothing), the non-identity
blocks applied and the steps taken. :func:`order_table` prints the matrix kept in
a run's ``metrics.json`` as markdown (``python -m ssroute.models.depth_stats RUN/metrics.json``).

>>> import torch
>>> stats = DepthStats(steps=2, choices=3, blocks=2)
>>> stats.add(torch.tensor([[0, 2], [1, -1]]), halted_at=torch.tensor([2.0, 1.0]))
>>> stats.order.tolist()
[[1, 1, 0], [0, 0, 1]]
>>> stats.summary(["b0", "b1", "id0"], order=False)["depth/blocks_per_image"]
1.0
"""

from __future__ import annotations

import json
import sys

import torch
from torch import Tensor


class DepthStats:
    """Running counts of depth-routing decisions.

    Args:
        steps: the most steps an image takes.
        choices: pool blocks plus identity blocks.
        blocks: pool blocks (choices ``>= blocks`` are identities).
    """

    def __init__(self, steps: int, choices: int, blocks: int) -> None:
        self.steps, self.choices, self.blocks = steps, choices, blocks
        self.reset()

    def reset(self) -> None:
        self.order = torch.zeros(self.steps, self.choices, dtype=torch.long)
        self.images, self.blocks_applied, self.steps_taken, self.ponder_sum = 0, 0, 0.0, None

    def add(self, picks: Tensor, halted_at: Tensor, ponder: Tensor | None = None) -> None:
        """One forward: ``picks [B, steps]`` (-1 = halted before that step), ``halted_at [B]`` steps taken, mean ponder cost."""
        taken = picks >= 0
        step = torch.arange(picks.shape[1], device=picks.device).expand_as(picks)
        cells = (step * self.choices + picks)[taken]
        counts = torch.bincount(cells, minlength=picks.shape[1] * self.choices).view(picks.shape[1], self.choices)
        self.order[: picks.shape[1]] += counts.cpu()
        self.images += picks.shape[0]
        self.blocks_applied += int((taken & (picks < self.blocks)).sum())
        self.steps_taken += float(halted_at.sum())
        if ponder is not None:
            self.ponder_sum = (self.ponder_sum or 0.0) + float(ponder) * picks.shape[0]

    def summary(self, names: list[str], order: bool) -> dict[str, float]:
        """Flat metrics (``{}`` before any forward); ``order`` adds ``depth/order/s{step}/{name}``, the share of images."""
        if not self.images:
            return {}
        picks = int(self.order.sum())
        blocks_per_image = self.blocks_applied / self.images
        metrics = {
            "depth/identity_share": float(self.order[:, self.blocks :].sum()) / max(picks, 1),
            "depth/blocks_per_image": blocks_per_image,
            "depth/steps_per_image": self.steps_taken / self.images,
            "depth/compute_saved": 1.0 - blocks_per_image / self.steps,
        }
        if self.ponder_sum is not None:
            metrics["depth/ponder_cost"] = self.ponder_sum / self.images
        if order:
            for step in range(self.steps):
                for j, name in enumerate(names):
                    metrics[f"depth/order/s{step}/{name}"] = float(self.order[step, j]) / self.images
        return metrics


def order_table(metrics: dict[str, float]) -> str:
    """The layer-order matrix of a ``metrics.json`` as a markdown table (rows: steps; cells: share of images)."""
    cells = {tuple(k.split("/")[2:]): v for k, v in metrics.items() if k.startswith("depth/order/")}
    steps = sorted({s for s, _ in cells}, key=lambda s: int(s[1:]))
    names = list(dict.fromkeys(n for _, n in cells))
    lines = ["| step | " + " | ".join(names) + " |", "|" + " --- |" * (len(names) + 1)]
    lines += [f"| {s[1:]} | " + " | ".join(f"{cells[(s, n)]:.2f}" for n in names) + " |" for s in steps]
    return "\n".join(lines)


if __name__ == "__main__":
    print(order_table(json.loads(open(sys.argv[1]).read())))
