"""Upcycling (MoEfication): trained dense FFNs split into experts (``split``), whole dense runs made routed (``run``).

``python -m ssroute.upcycle checkpoint=RUN`` is the command (``__main__``).
"""

from ssroute.upcycle.split import activation_mass, experts_from_ffn, neuron_groups, train_selection_router

__all__ = ["activation_mass", "experts_from_ffn", "neuron_groups", "train_selection_router"]
