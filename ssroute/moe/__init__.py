"""The MoE layer: a router (``ssroute.routing``) and an expert bank (``ssroute.experts``) executed together.

Nothing below this package imports it: routers and experts know nothing of each
other, the layer runs a :class:`~ssroute.routing.Routing` over an expert bank.
"""

from ssroute.moe.accounting import model_accounting, moe_layers
from ssroute.moe.layer import MoELayer, build_moe, dense_reference

__all__ = ["MoELayer", "build_moe", "dense_reference", "model_accounting", "moe_layers"]
