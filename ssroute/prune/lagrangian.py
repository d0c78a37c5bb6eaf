"""The Lagrangian target-sparsity controller of CoFI (Xia et al. 2022; Wang et al. 2020, "Structured Pruning of LLMs").

Instead of a fixed L0 penalty, the expected sparsity ``s`` is constrained to a
target ``t`` with two Lagrange multipliers::

    L_c = lambda_1 * (s - t) + lambda_2 * (s - t)^2

minimised over the model and the gates and *maximised* over the multipliers:
the multipliers' gradients are negated (:meth:`LagrangianController.forward`
registers the hook), so one AdamW step moves the model and the gates down and
the multipliers up, at their own learning rate ``reg_learning_rate``. While
``s`` stays short of ``t`` the multipliers keep growing, pushing the gates
shut. The target rises linearly from 0 over ``warmup_steps`` (the sparsity
warm-up) and stays at ``t`` afterwards.

>>> import torch
>>> controller = LagrangianController(target=0.5, warmup_steps=10)
>>> controller.target_at(5), controller.target_at(50)
(0.25, 0.5)
>>> float(controller(torch.tensor(0.3), step=50).detach())  # multipliers start at 0
0.0
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ssroute.errors import ConfigError


class LagrangianController(nn.Module):
    """``lambda_1 (s - t) + lambda_2 (s - t)^2`` with ascending multipliers and a linear target warm-up.

    Args:
        target: target sparsity in ``[0, 1)``.
        warmup_steps: steps over which the target rises from 0 (0 = the target from the first step).
    """

    def __init__(self, target: float, warmup_steps: int = 0) -> None:
        super().__init__()
        if not 0.0 <= target < 1.0:
            raise ConfigError(f"target_sparsity={target} must be in [0, 1): the share of the backbone's parameters to remove, e.g. 0.6.")
        self.target, self.warmup_steps = float(target), int(warmup_steps)
        self.lambda_1 = nn.Parameter(torch.zeros(()))
        self.lambda_2 = nn.Parameter(torch.zeros(()))

    def target_at(self, step: int) -> float:
        """The sparsity target at training step ``step`` (linear warm-up)."""
        if self.warmup_steps <= 0:
            return self.target
        return self.target * min(1.0, step / self.warmup_steps)

    def forward(self, expected_sparsity: Tensor, step: int) -> Tensor:
        """The Lagrangian term; backward sends the multipliers the *negated* gradient (ascent)."""
        gap = expected_sparsity - self.target_at(step)
        lambda_1, lambda_2 = self.lambda_1, self.lambda_2
        if torch.is_grad_enabled() and lambda_1.requires_grad:
            lambda_1 = lambda_1 + 0.0  # a fresh node, so the sign flip acts on this use only
            lambda_2 = lambda_2 + 0.0
            lambda_1.register_hook(torch.neg)
            lambda_2.register_hook(torch.neg)
        return lambda_1 * gap + lambda_2 * gap * gap
