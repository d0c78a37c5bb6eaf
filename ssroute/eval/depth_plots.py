"""Plots of routing over depth (``model=vit_depth``): what the notes list as the analyses of a depth router.

- :func:`plot_depth_order`: the block x step matrix ("matrix layer/T"), share of paths per choice and step;
- :func:`plot_depth_coselection`: choices used together on one path ("matrix layer/layer2"), diagonal removed;
- :func:`plot_identity_steps`: how many identity picks a path makes ("are identity layers used? When?");
- :func:`plot_depth_paths`: instance-wise routing — each image's path, or per token the choice of every
  patch at every step on the patch grid;
- :func:`plot_identity_over_training`: the training log's ``depth/identity_share`` against the step.

A path is an image, or a token with ``per_token=true``. :func:`write_depth_plots` writes the first four
for a backbone on some images (the evaluation's ``plots`` protocol calls it).

>>> import tempfile, pathlib, torch
>>> from ssroute.models.depth_stats import DepthStats
>>> stats = DepthStats(steps=2, choices=3, blocks=2)
>>> stats.add(torch.tensor([[0, 2], [1, 0]]), halted_at=torch.tensor([2.0, 2.0]))
>>> plot_depth_order(pathlib.Path(tempfile.mkdtemp()) / "order.png", stats, ["b0", "b1", "id0"]).suffix
'.png'
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from torch import Tensor, nn

from ssroute.eval.features import evaluating
from ssroute.eval.plots import _display, _save, expert_colours
from ssroute.models.depth_router import depth_stack
from ssroute.models.depth_stats import DepthStats


def _heatmap(path, matrix: np.ndarray, title: str, rows: list[str], columns: list[str]) -> Path:
    fig = Figure(figsize=(0.6 * len(columns) + 2.0, 0.45 * len(rows) + 1.6))
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="viridis", aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set_xticks(range(len(columns)), columns), ax.set_yticks(range(len(rows)), rows)
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white" if value < matrix.max() / 2 else "black")
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def plot_depth_order(path, stats: DepthStats, names: list[str]) -> Path:
    """Share of paths picking each choice (columns) at each step (rows)."""
    matrix = (stats.order.double() / max(stats.images, 1)).numpy()
    return _heatmap(path, matrix, "choice x step (share of paths)", [f"step {s}" for s in range(stats.steps)], names)


def plot_depth_coselection(path, stats: DepthStats, names: list[str]) -> Path:
    """Share of paths that used both choices somewhere, the diagonal (plain usage) removed."""
    return _heatmap(path, stats.coselect_share().numpy(), "choices used on one path (diagonal removed)", names, names)


def plot_identity_steps(path, stats: DepthStats) -> Path:
    """Share of paths by their number of identity picks."""
    share = (stats.identity_steps.double() / max(stats.images, 1)).numpy()
    fig = Figure(figsize=(3.6, 2.6))
    ax = fig.subplots()
    ax.bar(np.arange(len(share)), share, color="tab:gray")
    ax.set_xlabel("identity picks on the path"), ax.set_ylabel("share of paths"), ax.set_title("identity use per path", fontsize=9)
    return _save(fig, path)


def plot_depth_paths(path, picks: Tensor, images_uint8: Tensor, names: list[str], max_images: int = 8) -> Path:
    """Instance-wise routing: per image its choice at each step, or (``picks [B, N, S]``) every token's choice on the grid."""
    colours = expert_colours(len(names))
    shown = min(max_images, picks.shape[0])
    steps = picks.shape[-1]
    fig = Figure(figsize=(1.3 * (steps + 1), 1.3 * shown + 0.6))
    axes = fig.subplots(shown, steps + 1, squeeze=False)
    pictures = _display(images_uint8[:shown])
    for i in range(shown):
        axes[i, 0].imshow(pictures[i], cmap="gray" if pictures.shape[-1] == 1 else None)
        for s in range(steps):
            choice = picks[i, ..., s].cpu()
            if choice.dim() == 0:  # per image: one cell coloured by the choice
                cells = np.ones((1, 1, 4)) if int(choice) < 0 else colours[int(choice)][None, None]
                axes[i, s + 1].text(0, 0, "–" if int(choice) < 0 else names[int(choice)], ha="center", va="center", fontsize=8)
            else:  # per token: the patch grid coloured by each token's choice
                side = math.isqrt(choice.numel())
                grid = choice[: side * side].view(side, side).numpy()
                cells = np.where(grid[..., None] >= 0, colours[np.clip(grid, 0, None)], 1.0)
            axes[i, s + 1].imshow(cells, interpolation="nearest")
            if i == 0:
                axes[i, s + 1].set_title(f"step {s}", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    fig.legend(handles=[Patch(color=colours[j], label=n) for j, n in enumerate(names)], loc="lower center", ncol=len(names), fontsize=7)
    return _save(fig, path)


def plot_identity_over_training(path, metrics_csv) -> Path | None:
    """``depth/identity_share`` of the training log (``logs/metrics.csv``) against the step; None when the log has none."""
    points = []
    with open(metrics_csv, newline="") as handle:
        for row in csv.DictReader(handle):
            if row.get("depth/identity_share"):
                points.append((int(row["step"]), float(row["depth/identity_share"])))
    if not points:
        return None
    fig = Figure(figsize=(4.0, 2.6))
    ax = fig.subplots()
    ax.plot(*zip(*points, strict=True), color="tab:gray")
    ax.set_xlabel("step"), ax.set_ylabel("identity share of picks"), ax.set_title("identity use over training", fontsize=9)
    return _save(fig, path)


def depth_stats_of(backbone: nn.Module, images_normalised: Tensor, batch_size: int = 512) -> tuple[DepthStats, Tensor]:
    """The :class:`DepthStats` of ``backbone`` in eval mode on the images, and the picks of the first batch."""
    stack = depth_stack(backbone)
    stats = DepthStats(stack.max_steps, stack.num_choices, stack.num_blocks)
    first = None
    with evaluating(backbone):
        for chunk in images_normalised.split(batch_size):
            trace = backbone(chunk)[1].depth
            stats.add(trace.picks, trace.halted_at, trace.ponder)
            first = trace.picks if first is None else first
    return stats, first


def write_depth_plots(out_dir, backbone: nn.Module, images_normalised: Tensor, images_uint8: Tensor) -> list[Path]:
    """The order, co-selection, identity and instance-wise plots of a depth-routed backbone on the images."""
    out = Path(out_dir)
    stats, picks = depth_stats_of(backbone, images_normalised)
    names = depth_stack(backbone).names
    return [
        plot_depth_order(out / "depth_order.png", stats, names),
        plot_depth_coselection(out / "depth_coselection.png", stats, names),
        plot_identity_steps(out / "depth_identity.png", stats),
        plot_depth_paths(out / "depth_paths.png", picks, images_uint8, names),
    ]
