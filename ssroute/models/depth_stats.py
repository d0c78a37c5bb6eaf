"""Statistics of routing over depth: the layer-order matrix, co-selection, identity usage and blocks applied per path.

The notes ask "are identity layers used? When?", for the order in which
layers are deployed ("mat layer/T"), which layers are used together ("mat
layer/layer2", "correlation: remove the diagonal") and to "check nb params,
same for each timestep?". A *path* is what the router routes: an image, or a
token with ``per_token=true``. :class:`DepthStats` accumulates, over forwards
of a :class:`~ssroute.models.depth_router.DepthRoutedStack`, the layer-order
matrix ``order [steps, blocks + identities]`` (how many paths picked each
choice at each step; halted paths pick nothing), the co-selection matrix
``coselect [choices, choices]`` (how many paths used both choices somewhere;
its diagonal is plain usage, so it is reported without it), the identity picks
per path, the non-identity blocks applied and the steps taken.
:func:`depth_parameters` counts the pool, the router and the dense ViT of the
same depth. :func:`order_table` prints the matrix kept in a run's
``metrics.json`` as markdown (``python -m ssroute.models.depth_stats RUN/metrics.json``).

>>> import torch
>>> stats = DepthStats(steps=2, choices=3, blocks=2)
>>> stats.add(torch.tensor([[0, 2], [1, -1]]), halted_at=torch.tensor([2.0, 1.0]))
>>> stats.order.tolist()
[[1, 1, 0], [0, 0, 1]]
>>> stats.summary(["b0", "b1", "id0"], order=False)["depth/blocks_per_image"]
1.0
>>> stats.coselect_share().tolist()  # path 0 used b0 and id0 together
[[0.0, 0.0, 0.5], [0.0, 0.0, 0.0], [0.5, 0.0, 0.0]]
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
        self.coselect = torch.zeros(self.choices, self.choices, dtype=torch.long)
        self.identity_steps = torch.zeros(self.steps + 1, dtype=torch.long)  # paths by their number of identity picks
        self.images, self.blocks_applied, self.steps_taken, self.ponder_sum = 0, 0, 0.0, None

    def add(self, picks: Tensor, halted_at: Tensor, ponder: Tensor | None = None) -> None:
        """One forward: ``picks [paths..., steps]`` (-1 = halted before that step), ``halted_at [paths...]`` steps taken,
        mean ponder cost. Per-token traces (``[B, N, steps]``) count each token as a path."""
        picks, halted_at = picks.reshape(-1, picks.shape[-1]), halted_at.reshape(-1)
        taken = picks >= 0
        used = torch.zeros(picks.shape[0], self.choices + 1, dtype=torch.long, device=picks.device)
        used = used.scatter_(1, torch.where(taken, picks, self.choices), 1)[:, : self.choices]
        self.coselect += (used.T @ used).cpu()
        identities = (taken & (picks >= self.blocks)).sum(dim=1)
        self.identity_steps[: self.steps + 1] += torch.bincount(identities, minlength=self.steps + 1)[: self.steps + 1].cpu()
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
        metrics["depth/identity_paths"] = float(self.identity_steps[1:].sum()) / self.images  # paths with any identity pick
        if order:
            for step in range(self.steps):
                for j, name in enumerate(names):
                    metrics[f"depth/order/s{step}/{name}"] = float(self.order[step, j]) / self.images
            for a in range(self.choices):
                for b in range(a + 1, self.choices):
                    metrics[f"depth/coselect/{names[a]}/{names[b]}"] = float(self.coselect[a, b]) / self.images
        return metrics

    def coselect_share(self) -> Tensor:
        """``[choices, choices]`` share of paths that used both choices, the diagonal (usage alone) set to 0."""
        share = self.coselect.double() / max(self.images, 1)
        return share.fill_diagonal_(0.0)


def depth_parameters(stack) -> dict[str, float]:
    """Parameters of a :class:`~ssroute.models.depth_router.DepthRoutedStack` against the dense ViT of its depth.

    The pool is shared by every step, so each step applies one block's parameters whichever it picks
    (``depth/params_per_step``); ``depth/params_dense_blocks`` is a dense ViT with ``max_steps`` such blocks.
    """
    count = lambda module: float(sum(p.numel() for p in module.parameters())) if module is not None else 0.0  # noqa: E731
    per_block = count(stack.blocks[0])
    return {
        "depth/params_pool": count(stack.blocks),
        "depth/params_router": count(stack.controller) + count(stack.state_norm),
        "depth/params_halting": count(stack.halt_head),
        "depth/params_per_step": per_block,
        "depth/params_dense_blocks": per_block * stack.max_steps,
    }


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
