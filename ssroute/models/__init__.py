"""Backbones: a ViT whose chosen blocks carry an MoE FFN (``vit``), and routing over depth (``vit_depth``).

Every backbone's forward returns ``(features, ForwardAux)``; :func:`build_backbone`
builds the one a run config names (registry: :data:`MODELS`).
"""

from ssroute.models import vit, vit_depth  # noqa: F401  (registration)
from ssroute.models.registry import MODELS, build_backbone, build_selector, register_model
from ssroute.models.vit import ForwardAux, ViT

__all__ = ["MODELS", "ForwardAux", "ViT", "build_backbone", "build_selector", "register_model"]
