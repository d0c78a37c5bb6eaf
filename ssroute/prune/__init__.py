"""Structured pruning (CoFI, Xia et al. 2022) with L0 masks and distillation: ``python -m ssroute.prune checkpoint=RUN``.

``hard_concrete`` (the gates), ``shapes`` (what can be pruned), ``masks`` (gates applied by hooks),
``sparsity`` (real parameter counts), ``lagrangian`` (the target controller), ``distill`` (losses),
``surgery`` (physical removal), ``analytics``, ``module`` (the training step) and ``run`` (the command's driver).
"""
