"""Expert banks: what processes the tokens a router sends to each expert.

Registered by name in :data:`EXPERTS`; build one with
``build_experts(name, dim=..., hidden=..., num_experts=..., **options)``.
"""

from ssroute.experts import mlp  # noqa: F401  (registration)
from ssroute.experts.base import EXPERTS, ExpertBank, ExpertContext, build_experts

__all__ = ["EXPERTS", "ExpertBank", "ExpertContext", "build_experts"]
