"""SSL objectives by name (thin wrappers over lightly's heads and losses)."""

from ssroute.objectives import barlow_twins, byol, dino, simclr, vicreg  # noqa: F401  (registration)
from ssroute.objectives.base import OBJECTIVES, SSLObjective, build_objective

__all__ = ["OBJECTIVES", "SSLObjective", "build_objective"]
