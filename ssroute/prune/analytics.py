"""Where the masks pruned: per-layer and per-structure sparsity, non-uniformity, and clustering of kept units.

The research notes' questions about a CoFI run ("increase non uniformity of
sparsity", "enforce sparsity clusters", "entropy / KL from uniform", "ripley's
k and l functions"), answered from the deterministic gates:

- ``sparsity/block<i>/attn``, ``.../ffn``: share of each block's attention and
  FFN parameters removed (real counts, :mod:`ssroute.prune.sparsity`), and
  ``kept/<structure>``: share of heads, hidden units, experts, hidden coordinates kept;
- ``nonuniformity/entropy``: entropy of the distribution of *removed*
  parameters over the blocks, normalised to [0, 1] (1 = removed evenly),
  ``nonuniformity/kl_uniform`` its KL from uniform (``log L - H``) and
  ``nonuniformity/wasserstein_uniform`` the 1-D earth mover's distance between
  that distribution over block indices and the uniform one;
- ``ripley_l/<structure>``: Ripley's L function minus ``r`` of the kept units'
  indices (a 1-D point pattern on ``[0, width)``, translation edge correction),
  averaged over radii 1, 2, 4 and the blocks: > 0 means kept units cluster
  in index order, < 0 that they spread out, ~0 random placement. Dense FFN
  units have no meaningful order, so ~0 is expected there; expert units are
  sorted by weight magnitude first, so there it measures whether the kept ones are the strongest.

>>> import torch
>>> round(ripley_l(torch.tensor([0, 1, 2, 3]), width=16, radii=(1,)), 2)  # a tight run of kept units
3.27
>>> nonuniformity([0.5, 0.5])["nonuniformity/entropy"]
1.0
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.stats import wasserstein_distance
from torch import Tensor

from ssroute.prune.shapes import ModelShape
from ssroute.prune.sparsity import param_count

RADII = (1, 2, 4)


def ripley_l(points: Tensor, width: int, radii=RADII) -> float:
    """Mean over ``radii`` of ``L(r) - r`` for integer positions ``points`` in ``[0, width)`` (NaN below two points)."""
    x = points.double()
    n = x.numel()
    if n < 2:
        return float("nan")
    gaps = (x[:, None] - x[None, :]).abs()
    off = ~torch.eye(n, dtype=torch.bool)
    correction = width / (width - gaps).clamp_min(1.0)  # translation edge correction
    values = []
    for r in radii:
        k = width / (n * (n - 1)) * ((gaps <= r) & off).double().mul(correction).sum()
        values.append(float(k) / 2.0 - r)  # in 1-D, K(r) = 2r under complete spatial randomness
    return float(np.mean(values))


def nonuniformity(removed_per_block: list[float]) -> dict[str, float]:
    """Entropy (normalised), KL and Wasserstein distance from uniform of the removed parameters over the blocks."""
    mass = np.asarray(removed_per_block, dtype=float)
    blocks = len(mass)
    if mass.sum() <= 0 or blocks < 2:
        return {"nonuniformity/entropy": 1.0, "nonuniformity/kl_uniform": 0.0, "nonuniformity/wasserstein_uniform": 0.0}
    p = mass / mass.sum()
    entropy = -float(np.sum(p[p > 0] * np.log(p[p > 0])))
    index = np.arange(blocks)
    return {
        "nonuniformity/entropy": round(entropy / math.log(blocks), 6),
        "nonuniformity/kl_uniform": round(math.log(blocks) - entropy, 6),
        "nonuniformity/wasserstein_uniform": float(wasserstein_distance(index, index, p, np.full(blocks, 1.0 / blocks))),
    }


def mask_analytics(shape: ModelShape, z: dict[str, Tensor]) -> dict[str, float]:
    """The metrics above for deterministic gates ``z``."""
    keep = {name: (value != 0).float() for name, value in z.items()}
    full, kept = param_count(shape, {}), param_count(shape, keep)
    out: dict[str, float] = {}
    removed = []
    for i in range(len(shape.blocks)):
        gone = 0.0
        for part in ("attn", "ffn"):
            total, left = float(full[f"block{i}/{part}"]), float(kept[f"block{i}/{part}"])
            out[f"sparsity/block{i}/{part}"] = round(1.0 - left / total, 6) if total else 0.0
            gone += total - left
        removed.append(gone)
    out.update(nonuniformity(removed))
    for structure in ("mha", "ffn", "hidden", "heads", "units", "experts"):
        names = [n for n in keep if n == structure or n.startswith(f"{structure}_")]
        if names:
            out[f"kept/{structure}"] = round(float(sum(keep[n].sum() for n in names) / sum(keep[n].numel() for n in names)), 6)
    for structure in ("units", "hidden"):
        names = [n for n in z if n == structure or n.startswith(f"{structure}_")]
        values = [ripley_l(keep[n].nonzero().squeeze(1), keep[n].numel()) for n in names]
        values = [v for v in values if not math.isnan(v)]
        if values:
            out[f"ripley_l/{structure}"] = round(float(np.mean(values)), 6)
    return out


def write_sparsity_plot(metrics: dict[str, float], depth: int, path) -> None:
    """Bar chart of the removed share of each block's attention and FFN parameters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * depth, 3))
    index = np.arange(depth)
    for offset, part in ((-0.2, "attn"), (0.2, "ffn")):
        ax.bar(index + offset, [metrics.get(f"sparsity/block{i}/{part}", 0.0) for i in range(depth)], width=0.4, label=part)
    ax.set_xticks(index, [f"block {i}" for i in range(depth)])
    ax.set_ylim(0, 1)
    ax.set_ylabel("parameters removed")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
