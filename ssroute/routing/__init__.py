"""Routers: which expert processes which token.

Every router registers itself in :data:`ROUTERS` on import; build one with
``build_router(name, dim=..., num_experts=..., **options)``. A router returns a
:class:`Routing` (data); ``ssroute.moe.MoELayer`` executes it. Every sparse router
also takes ``random_fraction`` (:data:`COMMON_OPTIONS`): a share of tokens sent to
random experts (:mod:`ssroute.routing.random_share`).
"""

from ssroute.routing import dynamic_k, expert_choice, hashing, image, selection, set_matching, soft_moe, token_choice, vq  # noqa: F401  (registration)
from ssroute.routing.base import COMMON_OPTIONS, ROUTERS, Router, Routing, build_router, register_router
from ssroute.routing.k_schedule import K_SCHEDULES, build_k_schedule

__all__ = ["COMMON_OPTIONS", "K_SCHEDULES", "ROUTERS", "Router", "Routing", "build_k_schedule", "build_router", "register_router"]
