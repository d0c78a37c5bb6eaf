"""The Lagrangian controller drives the expected sparsity to the target against a task that wants every weight."""

from __future__ import annotations

import pytest
import torch

from ssroute.errors import ConfigError
from ssroute.prune.lagrangian import LagrangianController
from ssroute.prune.masks import MaskSet
from ssroute.prune.sparsity import expected_sparsity, sparsity
from tests.prune.helpers import build


@pytest.mark.parametrize("target,structures", [(0.3, None), (0.6, ["heads", "units", "hidden"])])
def test_controller_reaches_the_target_on_a_toy_model(target: float, structures) -> None:
    torch.manual_seed(0)
    vit, _ = build("token_choice", dim=16)
    masks = MaskSet(vit, structures, temperature=2.0 / 3.0).train()
    controller = LagrangianController(target, warmup_steps=50)
    optimizer = torch.optim.AdamW([*masks.parameters(), *controller.parameters()], lr=0.1, weight_decay=0.0)
    importance = {name: torch.rand(gate.shape) for name, gate in masks.gates.items()}  # what each structure is worth to the task
    for step in range(400):
        keep = masks.keep_probabilities()
        expected = expected_sparsity(masks.shape, keep)
        # the task wants every structure kept, some more than others: without the controller nothing would be pruned
        task = -0.01 * sum((importance[name] * p).sum() for name, p in keep.items())
        loss = task + controller(expected, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    final = float(expected_sparsity(masks.shape, masks.keep_probabilities()))
    assert abs(final - target) < 0.03, final
    assert float(controller.lambda_1) < 0  # L = lambda_1 (s - t): a negative multiplier pushes the sparsity up against the task
    deterministic = sparsity(masks.shape, {n: (z != 0).float() for n, z in masks.deterministic().items()})
    if structures is not None:  # fine structures polarise: the deterministic count is the expected one up to rounding
        assert abs(deterministic - final) < 0.03, (deterministic, final)
    else:  # a whole-layer gate left fractional at the saddle point rounds to a whole layer: the count moves by up to a layer
        assert abs(deterministic - final) < 0.15, (deterministic, final)


def test_multipliers_ascend_while_the_model_descends() -> None:
    controller = LagrangianController(0.5)
    expected = torch.tensor(0.2, requires_grad=True)
    with torch.no_grad():
        controller.lambda_1.fill_(1.0)
    controller(expected, step=0).backward()
    assert float(controller.lambda_1.grad) == pytest.approx(0.3)  # the negated d/d lambda_1 of lambda_1 * (0.2 - 0.5)
    assert float(expected.grad) == pytest.approx(1.0)  # the model side sees the plain gradient


def test_target_outside_zero_one_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"target_sparsity=1.0 must be in \[0, 1\)"):
        LagrangianController(1.0)
