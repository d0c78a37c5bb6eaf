"""Plots of routing (PNG, matplotlib's Agg canvas): each function writes one file and returns its path.

- :func:`plot_routing_maps`: sample images, each patch tinted by its top-1 expert, one row per MoE block;
- :func:`plot_view_links`: two augmented views side by side, corresponding patches linked
  (green: same top-1 expert in both views, red: not);
- :func:`plot_expert_usage`, :func:`plot_co_selection`, :func:`plot_class_expert`,
  :func:`plot_block_vs_block`: from :class:`~ssroute.eval.analytics.RoutingAnalytics`;
- :func:`plot_stability_curve` (agreement vs augmentation strength, chance dashed) and
  :func:`plot_family_agreement`: from :class:`~ssroute.eval.stability.StabilityResult`;
- :func:`plot_probe_accuracy`: per-block probe accuracy from ``block{i}/knn_top1``-style keys.

:func:`write_all_plots` writes what applies to a run. Figures are built with
``matplotlib.figure.Figure`` directly, never through pyplot's global state, so
plotting works headless and from any thread.

>>> import tempfile, pathlib
>>> path = plot_probe_accuracy(pathlib.Path(tempfile.mkdtemp()) / "probe.png", {"block0/knn_top1": 0.5, "block1/knn_top1": 0.8})
>>> path.read_bytes()[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
True
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from ssroute.config import AugmentConfig
from ssroute.data.correspondence import matches_of
from ssroute.data.views import ViewAugment
from ssroute.eval.analytics import RoutingAnalytics
from ssroute.eval.features import evaluating
from ssroute.eval.fluctuation import top1_experts
from ssroute.eval.stability import StabilityResult, as_augment_config, normalisation_of
from ssroute.moe import moe_layers


def expert_colours(num_experts: int) -> np.ndarray:
    """``[E, 4]`` RGBA colours, distinct for up to 20 experts."""
    cmap = matplotlib.colormaps["tab10" if num_experts <= 10 else "tab20" if num_experts <= 20 else "hsv"]
    return np.asarray([cmap(i if num_experts <= 20 else i / num_experts) for i in range(num_experts)])


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _display(images: Tensor) -> np.ndarray:
    """``[n, C, H, W]`` images in [0, 1] (or uint8) -> ``[n, H, W, 3]`` for imshow."""
    x = images.detach().float().cpu()
    x = x / 255.0 if images.dtype == torch.uint8 else x.clamp(0, 1)
    return (x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x[:, :3]).permute(0, 2, 3, 1).numpy()


def _overlay(top1: Tensor, centres: Tensor, patch_size: int, image_size: int, colours: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """``[H, W, 4]`` RGBA layer: each patch's square (around its centre) in its expert's colour."""
    layer = np.zeros((image_size, image_size, 4))
    corner = (centres.cpu() - (patch_size - 1) / 2).round().long().clamp(0, image_size - patch_size)
    offsets = torch.arange(patch_size)
    ys = (corner[:, 1, None, None] + offsets[None, :, None]).expand(-1, patch_size, patch_size)
    xs = (corner[:, 0, None, None] + offsets[None, None, :]).expand(-1, patch_size, patch_size)
    rgba = colours[top1.cpu().numpy()].copy()
    rgba[:, 3] = alpha
    layer[ys.numpy(), xs.numpy()] = rgba[:, None, None, :]
    return layer


def _route(backbone: nn.Module, images: Tensor):
    """(``block{i} -> [images, tokens]`` top-1 experts of every MoE block, ``[images, tokens, 2]`` patch centres, the aux), in eval mode."""
    with evaluating(backbone):
        _, aux = backbone(images)
    routes = {f"block{i}": top1_experts(r).view(images.shape[0], -1).cpu() for i, r in sorted(aux.routings.items())}
    return routes, aux.patches.centres.cpu(), aux


def _tokens(top1: Tensor, num_tokens: int) -> Tensor:
    return top1 if top1.shape[1] == num_tokens else top1[:, :1].expand(-1, num_tokens)  # image routers: one expert per image


def plot_routing_maps(path, backbone: nn.Module, images_uint8: Tensor, normalize: Callable[[Tensor], Tensor], max_images: int = 8) -> Path:
    """Sample images with each patch tinted by its top-1 expert; a row per MoE block."""
    images = images_uint8[:max_images]
    routes, centres, _ = _route(backbone, normalize(images))
    embed = backbone.patch_embed
    num_experts = next(iter(moe_layers(backbone).values())).num_experts
    colours, shown = expert_colours(num_experts), _display(images)
    fig = Figure(figsize=(1.3 * len(images) + 1.2, 1.4 * len(routes) + 0.4))
    axes = fig.subplots(len(routes), len(images), squeeze=False)
    for row, (block, top1) in enumerate(routes.items()):
        top1 = _tokens(top1, embed.num_tokens)
        for col, ax in enumerate(axes[row]):
            ax.imshow(shown[col], interpolation="nearest")
            ax.imshow(_overlay(top1[col], centres[col], embed.patch_size, embed.image_size, colours), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
        axes[row, 0].set_ylabel(block)
    handles = [matplotlib.patches.Patch(color=colours[e], label=f"expert {e}") for e in range(num_experts)]
    fig.legend(handles=handles, loc="center right", fontsize=7)
    fig.suptitle("top-1 expert of each patch")
    return _save(fig, path)


def plot_view_links(
    path, backbone: nn.Module, augment: ViewAugment, images_uint8: Tensor, max_images: int = 3, max_links: int = 12, seed: int = 0
) -> Path:
    """Two augmented views per image side by side, a subsample of corresponding patches linked, for the first MoE block."""
    images = images_uint8[:max_images]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        views = augment(images, num_views=2)
        pick = torch.rand(images.shape[0], backbone.patch_embed.num_tokens).argsort(dim=1)
    embed = backbone.patch_embed
    routes1, centres1, aux1 = _route(backbone, views.images[0])
    routes2, centres2, aux2 = _route(backbone, views.images[1])
    match, _ = matches_of(views, (aux1.patches, aux2.patches), embed)
    block = next(iter(routes1))
    first, second = _tokens(routes1[block], embed.num_tokens), _tokens(routes2[block], embed.num_tokens)
    num_experts = next(iter(moe_layers(backbone).values())).num_experts
    colours, size, gap = expert_colours(num_experts), embed.image_size, embed.image_size * 0.25
    shown = [_display(v * augment.std + augment.mean) for v in views.images]
    fig = Figure(figsize=(5.0, 2.4 * len(images)))
    axes = fig.subplots(len(images), 1, squeeze=False)[:, 0]
    for i, ax in enumerate(axes):
        for v, (top1, x0, centres) in enumerate(((first, 0.0, centres1), (second, size + gap, centres2))):
            extent = (x0 - 0.5, x0 + size - 0.5, size - 0.5, -0.5)
            ax.imshow(shown[v][i], extent=extent, interpolation="nearest")
            ax.imshow(_overlay(top1[i], centres[i], embed.patch_size, size, colours, alpha=0.3), extent=extent, interpolation="nearest")
        valid = match.valid[i].cpu()
        links = [t for t in pick[i].tolist() if valid[t]][:max_links]
        for t in links:
            partner = int(match.partner[i, t])
            same = bool(first[i, t] == second[i, partner])
            (x1, y1), (x2, y2) = centres1[i, t].tolist(), centres2[i, partner].tolist()
            ax.plot([x1, x2 + size + gap], [y1, y2], color="limegreen" if same else "red", linewidth=1.0, marker="o", markersize=2)
        ax.set_xlim(-0.5, 2 * size + gap - 0.5), ax.set_ylim(size - 0.5, -0.5)
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_title(f"{block}: {len(links)} linked patches (green = same expert)", fontsize=8)
    return _save(fig, path)


def plot_expert_usage(path, analytics: RoutingAnalytics) -> Path:
    """Share of the load per expert, one panel per MoE block; the dashed line is perfect balance."""
    blocks = analytics.blocks
    fig = Figure(figsize=(3.0 * len(blocks) + 0.5, 2.6))
    for ax, (block, data) in zip(fig.subplots(1, len(blocks), squeeze=False)[0], blocks.items(), strict=True):
        share = (data.load.double() / data.load.sum().clamp_min(1)).numpy()
        ax.bar(np.arange(len(share)), share, color=expert_colours(len(share)))
        ax.axhline(1 / len(share), color="black", linestyle="--", linewidth=1)
        ax.set_title(block), ax.set_xlabel("expert"), ax.set_ylabel("share of load")
    return _save(fig, path)


def _heatmaps(path, matrices: dict[str, Tensor], title: str, xlabel: str, ylabel: str) -> Path:
    fig = Figure(figsize=(3.4 * len(matrices) + 0.5, 3.2))
    for ax, (name, matrix) in zip(fig.subplots(1, len(matrices), squeeze=False)[0], matrices.items(), strict=True):
        image = ax.imshow(matrix.double().numpy(), cmap="viridis", aspect="auto", interpolation="nearest")
        fig.colorbar(image, ax=ax, fraction=0.046)
        ax.set_title(name, fontsize=9), ax.set_xlabel(xlabel), ax.set_ylabel(ylabel)
    fig.suptitle(title)
    return _save(fig, path)


def plot_co_selection(path, analytics: RoutingAnalytics) -> Path:
    """Share of tokens that use experts i and j together (k > 1), per block."""
    matrices = {b: d.co_selection for b, d in analytics.blocks.items() if d.co_selection is not None}
    return _heatmaps(path, matrices, "experts chosen together (share of tokens)", "expert", "expert")


def plot_class_expert(path, analytics: RoutingAnalytics) -> Path:
    """Share of each class's tokens per expert, per block."""
    matrices = {b: d.class_expert for b, d in analytics.blocks.items() if d.class_expert is not None}
    return _heatmaps(path, matrices, "class x expert (rows sum to 1)", "expert", "class")


def plot_block_vs_block(path, analytics: RoutingAnalytics) -> Path:
    """Joint share of tokens by their top-1 expert at block i (rows) and block j (columns)."""
    matrices = {f"{i} vs {j}": m for (i, j), m in analytics.cross_block.items()}
    return _heatmaps(path, matrices, "top-1 expert at block i vs block j (share of tokens)", "expert at block j", "expert at block i")


def plot_stability_curve(path, stability: StabilityResult) -> Path:
    """Top-1 agreement of corresponding patches vs augmentation strength, a line per block; chance dashed."""
    fig = Figure(figsize=(4.8, 3.4))
    ax = fig.subplots()
    blocks = [name for name in stability.curves if "/" not in name]
    for colour, block in zip(expert_colours(max(len(blocks), 1)), blocks, strict=False):
        s, agreement = zip(*stability.curves[block], strict=True)
        ax.plot(s, agreement, marker="o", color=colour, label=block)
        if f"{block}/chance" in stability.curves:
            s, chance = zip(*stability.curves[f"{block}/chance"], strict=True)
            ax.plot(s, chance, linestyle="--", color=colour, label=f"{block} chance")
    ax.axvline(1.0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("augmentation strength (1 = the run's)"), ax.set_ylabel("top-1 routing agreement"), ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_family_agreement(path, stability: StabilityResult) -> Path:
    """Agreement with one augmentation family on at a time, grouped bars per block; chance as black ticks."""
    found = [re.fullmatch(r"(block\d+)/family/(\w+)/routing_agreement", k) for k in stability.metrics]
    pairs = [(m.group(1), m.group(2)) for m in found if m]
    blocks, families = sorted({b for b, _ in pairs}, key=lambda b: int(b[5:])), list(dict.fromkeys(f for _, f in pairs))
    fig = Figure(figsize=(1.1 * len(families) * max(len(blocks), 1) + 1.5, 3.2))
    ax = fig.subplots()
    width = 0.8 / max(len(blocks), 1)
    for k, (colour, block) in enumerate(zip(expert_colours(max(len(blocks), 1)), blocks, strict=False)):
        x = np.arange(len(families)) + k * width
        ax.bar(x, [stability.metrics[f"{block}/family/{f}/routing_agreement"] for f in families], width, color=colour, label=block)
        ax.scatter(
            x,
            [stability.metrics.get(f"{block}/family/{f}/routing_agreement_chance", np.nan) for f in families],
            marker="_",
            color="black",
            s=200,
        )
    ax.set_xticks(np.arange(len(families)) + width * (len(blocks) - 1) / 2, families)
    ax.set_ylabel("top-1 routing agreement"), ax.set_ylim(0, 1.02), ax.legend(fontsize=7)
    return _save(fig, path)


def plot_probe_accuracy(path, probes: dict[str, float]) -> Path:
    """Accuracy of each probe (``block{i}/{probe}`` keys) over the blocks of the stack."""
    series: dict[str, dict[int, float]] = {}
    for key, value in probes.items():
        m = re.fullmatch(r"block(\d+)/(\w+)", key)
        if m:
            series.setdefault(m.group(2), {})[int(m.group(1))] = float(value)
    fig = Figure(figsize=(4.8, 3.4))
    ax = fig.subplots()
    for colour, (probe, points) in zip(expert_colours(max(len(series), 1)), sorted(series.items()), strict=False):
        blocks = sorted(points)
        ax.plot(blocks, [points[b] for b in blocks], marker="o", color=colour, label=probe)
    ax.set_xlabel("block"), ax.set_ylabel("accuracy"), ax.legend(fontsize=7)
    ax.xaxis.get_major_locator().set_params(integer=True)
    return _save(fig, path)


def write_all_plots(
    out_dir,
    *,
    backbone: nn.Module,
    images_uint8: Tensor | None,
    normalize: Callable[[Tensor], Tensor],
    augment: ViewAugment | AugmentConfig | None,
    analytics: RoutingAnalytics | None,
    stability: StabilityResult | None,
    probes: dict[str, float] | None,
) -> list[Path]:
    """Write every plot that applies into ``out_dir``; return their paths.

    Skipped: routing maps and view links without an MoE layer or images, view
    links without ``augment`` (a ViewAugment, or the run's ``data.augment``),
    co-selection without a block using k > 1, class x expert without labels,
    block-vs-block with one routing block, stability without a result, probes
    without ``block{i}/...`` keys.
    """
    out = Path(out_dir)
    written: list[Path] = []
    routed = bool(moe_layers(backbone))
    if routed and images_uint8 is not None and len(images_uint8):
        written.append(plot_routing_maps(out / "routing_maps.png", backbone, images_uint8, normalize))
        if augment is not None and not isinstance(augment, ViewAugment):
            channels = images_uint8.shape[1]
            augment = ViewAugment(
                as_augment_config(augment), channels, images_uint8.shape[-1], *normalisation_of(normalize, channels, images_uint8.device)
            )
        if augment is not None:
            written.append(plot_view_links(out / "view_links.png", backbone, augment.to(images_uint8.device), images_uint8))
    if analytics is not None and analytics.blocks:
        written.append(plot_expert_usage(out / "expert_usage.png", analytics))
        if any(
            analytics.metrics.get(f"{b}/experts_per_token", 1.0) > 1.0 and d.co_selection is not None for b, d in analytics.blocks.items()
        ):
            written.append(plot_co_selection(out / "co_selection.png", analytics))
        if any(d.class_expert is not None for d in analytics.blocks.values()):
            written.append(plot_class_expert(out / "class_expert.png", analytics))
        if analytics.cross_block:
            written.append(plot_block_vs_block(out / "block_vs_block.png", analytics))
    if stability is not None and stability.curves:
        written.append(plot_stability_curve(out / "stability_strength.png", stability))
    if stability is not None and any("/family/" in k for k in stability.metrics):
        written.append(plot_family_agreement(out / "stability_families.png", stability))
    if probes and any(re.fullmatch(r"block\d+/\w+", k) for k in probes):
        written.append(plot_probe_accuracy(out / "probe_accuracy.png", probes))
    return written
