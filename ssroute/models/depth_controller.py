"""The router of routing over depth: linear, or recurrent (GRU, LSTM) with a state carried across steps.

The notes ask "Router architecture: LSTM vs linear?" and whether to "tell the
router where we are (pos or scalar), or give the whole sequence". At step ``s``
the controller reads a routing state ``[rows, dim]`` (rows: images, or tokens
for per-token routing) and returns logits over the pool's choices:

- ``kind="linear"``: ``logits = W state`` — no memory; the step is all it knows
  of the path so far (through ``step_input``);
- ``kind="gru"`` / ``"lstm"``: a ``torch.nn.GRUCell`` / ``LSTMCell`` of width
  ``hidden`` updates a memory from the state at every step and
  ``logits = W memory``: the router sees the whole sequence of states (and, by
  them, of its own earlier choices), as a recurrent controller does.

``step_input`` tells the router where it is:

- ``"embedding"``: a learned bias per step on the logits (a one-hot step input
  through a linear map); ``order_prior`` initialises it towards block ``s`` at
  step ``s``, so an untrained stack starts near the dense ViT;
- ``"scalar"``: ``s / (max_steps - 1)`` appended to the state;
- ``"none"``: nothing (a recurrent router still counts steps in its memory).

``order_prior`` needs the per-step bias, so it acts only with ``step_input=embedding``.

>>> import torch
>>> controller = DepthController(dim=8, choices=3, max_steps=4, kind="gru", step_input="scalar", hidden=6)
>>> memory = controller.initial(5, torch.device("cpu"))
>>> logits, memory = controller(torch.randn(5, 8), step=0, memory=memory)
>>> logits.shape, memory.shape
(torch.Size([5, 3]), torch.Size([5, 6]))
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ssroute.errors import ConfigError

KINDS = ("linear", "gru", "lstm")
STEP_INPUTS = ("none", "scalar", "embedding")


class DepthController(nn.Module):
    """Logits over the pool's choices at each step, from the routing state and (recurrent kinds) a memory.

    Args:
        dim: width of the routing state.
        choices: pool blocks plus identities.
        max_steps: the most steps.
        kind: ``linear``, ``gru`` or ``lstm``.
        step_input: ``none``, ``scalar`` or ``embedding`` (see the module docstring).
        hidden: memory width of a recurrent router; None = ``dim``.
    """

    def __init__(
        self, dim: int, choices: int, max_steps: int, kind: str = "linear", step_input: str = "embedding", hidden: int | None = None
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ConfigError(f"model.depth_router.kind={kind!r} is unknown; choose one of: {', '.join(KINDS)}.")
        if step_input not in STEP_INPUTS:
            raise ConfigError(f"model.depth_router.step_input={step_input!r} is unknown; choose one of: {', '.join(STEP_INPUTS)}.")
        hidden = dim if hidden is None else int(hidden)
        if hidden < 1:
            raise ConfigError(f"model.depth_router.router_hidden={hidden} must be a positive width, or null for model.dim.")
        self.kind, self.step_input, self.max_steps = kind, step_input, max_steps
        inputs = dim + (step_input == "scalar")
        cells = {"gru": nn.GRUCell, "lstm": nn.LSTMCell}
        self.cell = cells[kind](inputs, hidden) if kind in cells else None
        self.router = nn.Linear(hidden if self.cell is not None else inputs, choices)
        self.step_bias = nn.Parameter(torch.zeros(max_steps, choices)) if step_input == "embedding" else None

    def initial(self, rows: int, device: torch.device) -> Any:
        """The memory before the first step: None (linear), ``h [rows, hidden]`` (GRU) or ``(h, c)`` (LSTM), zeros."""
        if self.cell is None:
            return None
        zeros = torch.zeros(rows, self.cell.hidden_size, device=device)
        return (zeros, zeros.clone()) if self.kind == "lstm" else zeros

    @staticmethod
    def select(memory: Any, index: Tensor) -> Any:
        """The memory of the rows ``index``."""
        if memory is None:
            return None
        return tuple(m.index_select(0, index) for m in memory) if isinstance(memory, tuple) else memory.index_select(0, index)

    @staticmethod
    def update(memory: Any, index: Tensor, new: Any) -> Any:
        """``memory`` with the rows ``index`` replaced by ``new``."""
        if memory is None:
            return None
        if isinstance(memory, tuple):
            return tuple(m.index_copy(0, index, n) for m, n in zip(memory, new, strict=True))
        return memory.index_copy(0, index, new)

    def forward(self, state: Tensor, step: int, memory: Any = None) -> tuple[Tensor, Any]:
        """``(logits [rows, choices], new memory)`` at ``step`` for routing states ``[rows, dim]``."""
        if self.step_input == "scalar":
            where = torch.full_like(state[:, :1], step / max(self.max_steps - 1, 1))
            state = torch.cat([state, where], dim=1)
        if self.cell is not None:
            memory = self.cell(state, memory)
            logits = self.router(memory[0] if isinstance(memory, tuple) else memory)
        else:
            logits = self.router(state)
        if self.step_bias is not None:
            logits = logits + self.step_bias[step]
        return logits, memory
