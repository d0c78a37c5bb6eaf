"""Patch selection (``patches=``): which N patches of each image become tokens.

Selectors register in :data:`PATCH_SELECTORS`; :func:`build_patch_selector`
builds the one a run's ``patches`` config names (``None`` for the grid itself,
which the patch embedding computes with its convolution). Measurements:
``docs/patches.md``.
"""

from __future__ import annotations

import inspect
from typing import Any

from ssroute.data.correspondence import extract_patches
from ssroute.patches import entropy, maxsum, sequential, uniform  # noqa: F401  (registration)
from ssroute.patches.base import PATCH_SELECTORS, Patches, PatchSelector, candidate_centres

__all__ = [
    "PATCH_SELECTORS",
    "PatchSelector",
    "Patches",
    "build_patch_selector",
    "candidate_centres",
    "extract_patches",
]


def build_patch_selector(cfg: Any, patch_size: int, image_size: int, dim: int) -> PatchSelector | None:
    """The selector of a ``patches`` config (:class:`ssroute.config.PatchesConfig`); None = the plain grid.

    >>> from ssroute.config import PatchesConfig
    >>> build_patch_selector(PatchesConfig(name="grid"), patch_size=4, image_size=28, dim=32) is None
    True
    >>> type(build_patch_selector(PatchesConfig(name="entropy_topk", num_patches=25), 4, 28, 32)).__name__
    'EntropyTopK'
    """
    grid_count = (image_size // patch_size) ** 2
    num = grid_count if cfg.num_patches is None else cfg.num_patches
    if cfg.name == "grid" and num == grid_count:
        return None
    selector = PATCH_SELECTORS.get(cfg.name)
    wanted = inspect.signature(selector.__init__).parameters
    options = {"dim": dim, **{key: getattr(cfg, key) for key in _OPTION_KEYS}}
    return selector(patch_size=patch_size, image_size=image_size, num_patches=num, **{k: v for k, v in options.items() if k in wanted})


_OPTION_KEYS = ("stride", "entropy_window", "entropy_bins", "halt_epsilon", "ponder_weight")
