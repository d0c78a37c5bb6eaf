"""The expert-bank interface: run ``E`` experts over tokens sorted by expert.

An MoE layer hands its bank the routed rows **already sorted by expert** —
``x [rows, dim]`` where the first ``sizes[0]`` rows go to expert 0, the next
``sizes[1]`` to expert 1, and so on — plus an :class:`ExpertContext` saying
where each row came from (its flat token index and image), so banks that look
beyond one token (an attention expert attends within the routed tokens of the
same image) can. The bank returns ``[rows, dim]`` in the same order; the layer
weights and scatters them back. Sparse routings pass tokens, soft MoE passes
slots (``token_index=None``, ``slot_image`` set).

To add an expert type, subclass :class:`ExpertBank`, implement ``forward``,
and register it: ``@EXPERTS.register("name")``. Its constructor takes
``dim, hidden, num_experts`` plus keyword options (validated by name).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from torch import Tensor, nn

from ssroute.registry import Registry, check_options


@dataclass
class ExpertContext:
    """Provenance of the expert-sorted rows.

    Attributes:
        token_index: ``[rows]`` flat index into the ``[images * tokens_per_image]``
            tokens of each row; None when rows are soft-MoE slots.
        tokens_per_image: tokens per image ``N`` (the routing group size).
        num_images: images ``B`` in the batch.
        slot_image: ``[rows]`` image of each slot row (soft MoE only).
        valid: ``[rows]`` bool, False for rows that hold no token (the empty
            capacity slots of :func:`ssroute.moe.dense_reference`); experts that
            look beyond one row (attention, conv) leave them out of every other
            row's context. None = every row is a token.
    """

    token_index: Tensor | None
    tokens_per_image: int
    num_images: int
    slot_image: Tensor | None = None
    valid: Tensor | None = None

    @property
    def image_index(self) -> Tensor:
        """``[rows]`` image each row belongs to."""
        if self.token_index is None:
            assert self.slot_image is not None
            return self.slot_image
        return self.token_index // self.tokens_per_image

    def select(self, rows: Tensor) -> ExpertContext:
        """The context of the rows ``rows`` (a ``[rows']`` index), in that order."""

        def pick(values: Tensor | None) -> Tensor | None:
            return None if values is None else values.index_select(0, rows)

        return replace(self, token_index=pick(self.token_index), slot_image=pick(self.slot_image), valid=pick(self.valid))


@dataclass
class TypeCost:
    """What the experts of one type in a bank cost."""

    experts: int  # experts of this type
    params: float  # parameters of this type's experts (their shared ones included)
    flops_per_row: float  # FLOPs one of its experts spends on one row


class ExpertBank(nn.Module):
    """``E`` experts applied block-wise to expert-sorted rows.

    Args:
        dim: token width.
        hidden: one expert's hidden width.
        num_experts: number of experts ``E``.
    """

    def __init__(self, dim: int, hidden: int, num_experts: int) -> None:
        super().__init__()
        self.dim, self.hidden, self.num_experts = dim, hidden, num_experts

    def forward(self, x: Tensor, sizes: list[int], context: ExpertContext) -> Tensor:
        """``x [rows, dim]`` sorted by expert, ``sizes`` rows per expert (``len == E``) -> ``[rows, dim]``."""
        raise NotImplementedError

    def shared_params(self) -> int:
        """Parameters every routed row uses (e.g. a hypernetwork); 0 for independent experts."""
        return 0

    def params_per_expert(self) -> float:
        """Parameters one expert owns (what a row routed to it activates besides the shared ones)."""
        total = sum(p.numel() for p in self.parameters())
        return (total - self.shared_params()) / self.num_experts

    def flops_per_row(self, tokens_per_image: int) -> float:
        """FLOPs (2 x multiply-adds) one expert spends on one row."""
        raise NotImplementedError

    def type_costs(self, tokens_per_image: int) -> dict[str, TypeCost]:
        """Experts, parameters and FLOPs per row by expert type (one type, unless the bank mixes them)."""
        name = next((n for n in EXPERTS.names() if EXPERTS.get(n) is type(self)), type(self).__name__)
        return {name: TypeCost(self.num_experts, float(sum(p.numel() for p in self.parameters())), self.flops_per_row(tokens_per_image))}


EXPERTS: Registry[type[ExpertBank]] = Registry("expert bank")


def build_experts(name: str, dim: int, hidden: int, num_experts: int, **options: Any) -> ExpertBank:
    """Build a registered expert bank, e.g. ``build_experts("mlp", dim=64, hidden=256, num_experts=8)``."""
    cls = EXPERTS.get(name)
    check_options("expert bank", name, cls, options, fixed=("dim", "hidden", "num_experts"))
    return cls(dim=dim, hidden=hidden, num_experts=num_experts, **options)
