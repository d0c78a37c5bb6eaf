"""Mixed expert banks: each expert of one layer of its own type, behind one router.

The research notes ask for "different layer types (attn, conv, LUT, etc. or
some combination)". ``experts=mixed experts.types=[mlp, mlp, lut, attention]``
makes expert ``e`` of type ``types[e % len(types)]`` (a list shorter than
``num_experts`` repeats; a longer one is refused). Experts of one
type form one bank of that type (``ssroute.experts``), so each type keeps its
batched execution and its parameters are that bank's.

The layer's one sort-and-gather path is unchanged: it hands this bank the rows
sorted by expert. One stable ``argsort`` regroups them type by type (expert
order kept within a type), each type's bank runs once on its contiguous block
with the matching slice of the :class:`ExpertContext`, and one ``index_copy``
puts the outputs back — a loop over types, never over tokens.

Accounting: :meth:`MixedExperts.type_costs` gives each type's experts,
parameters and FLOPs per row; ``ssroute.moe`` adds per-type keys
(``experts/<type>/params``, ``experts/<type>/flops_per_token``) that sum to
the layer's expert totals.

>>> import torch
>>> from ssroute.experts.base import ExpertContext
>>> bank = MixedExperts(dim=8, hidden=16, num_experts=4, types=["mlp", "lut", "mlp", "conv"])
>>> [bank.type_of(e) for e in range(4)], sorted(bank.banks)
(['mlp', 'lut', 'mlp', 'conv'], ['conv', 'lut', 'mlp'])
>>> bank(torch.randn(6, 8), [2, 1, 0, 3], ExpertContext(torch.tensor([0, 5, 1, 2, 3, 7]), 4, 2)).shape
torch.Size([6, 8])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ssroute.errors import ConfigError
from ssroute.experts.base import EXPERTS, ExpertBank, ExpertContext, TypeCost, build_experts


@EXPERTS.register("mixed")
class MixedExperts(ExpertBank):
    """Experts of several types in one bank.

    Args:
        dim: token width.
        hidden: one expert's hidden width (each type reads it as its own ``hidden``).
        num_experts: number of experts ``E``.
        types: expert types (registered names, not ``mixed``); expert ``e`` is ``types[e % len(types)]``;
            None = ``[mlp, conv, lut, attention]``.
        options: per-type options, e.g. ``{lut: {key: hash}, attention: {heads: 2}}``.
    """

    def __init__(
        self, dim: int, hidden: int, num_experts: int, types: list[str] | None = None, options: dict[str, dict[str, Any]] | None = None
    ) -> None:
        super().__init__(dim, hidden, num_experts)
        types = list(types or ["mlp", "conv", "lut", "attention"])
        options = {name: dict(opts or {}) for name, opts in (options or {}).items()}
        if not 1 <= len(types) <= num_experts:
            raise ConfigError(
                f"experts mixed: types lists {len(types)} types for num_experts={num_experts}; list between 1 and {num_experts} "
                "(a shorter list repeats), or raise model.num_experts."
            )
        for name in {*types, *options}:
            if name == "mixed":
                raise ConfigError("experts mixed: types cannot contain mixed; list plain expert types such as mlp, lut, attention, conv.")
            EXPERTS.get(name)  # an unknown name gets the registry's sentence
        unused = sorted(set(options) - set(types))
        if unused:
            raise ConfigError(
                f"experts mixed: options for {', '.join(unused)}, which is not in types={types}; add it to types or drop its options."
            )
        self.types = types
        self.expert_types = [types[e % len(types)] for e in range(num_experts)]
        names = list(dict.fromkeys(self.expert_types))  # first-appearance order
        self.banks = nn.ModuleDict(
            {
                name: build_experts(name, dim=dim, hidden=hidden, num_experts=self.expert_types.count(name), **options.get(name, {}))
                for name in names
            }
        )
        # experts in type-major order (expert order within a type), and each expert's place in it
        grouped = [e for name in names for e in range(num_experts) if self.expert_types[e] == name]
        self.register_buffer("rank", torch.argsort(torch.tensor(grouped)), persistent=False)
        self.members = {name: [e for e in grouped if self.expert_types[e] == name] for name in names}

    def type_of(self, expert: int) -> str:
        return self.expert_types[expert]

    def shared_params(self) -> int:
        return sum(bank.shared_params() for bank in self.banks.values())

    def flops_per_row(self, tokens_per_image: int) -> float:
        """The mean over experts: the cost of a row when every expert gets the same share of rows."""
        costs = self.type_costs(tokens_per_image)
        return sum(c.experts * c.flops_per_row for c in costs.values()) / self.num_experts

    def type_costs(self, tokens_per_image: int) -> dict[str, TypeCost]:
        """Experts, parameters and FLOPs per row of each type."""
        return {
            name: TypeCost(bank.num_experts, float(sum(p.numel() for p in bank.parameters())), bank.flops_per_row(tokens_per_image))
            for name, bank in self.banks.items()
        }

    def forward(self, x: Tensor, sizes: list[int], context: ExpertContext | None) -> Tensor:
        if x.shape[0] == 0:
            return x
        expert = torch.repeat_interleave(torch.arange(self.num_experts, device=x.device), torch.tensor(sizes, device=x.device))
        order = torch.argsort(self.rank.index_select(0, expert), stable=True)  # rows type by type
        grouped = x.index_select(0, order)
        outputs, start = [], 0
        for name, bank in self.banks.items():
            block_sizes = [sizes[e] for e in self.members[name]]
            rows = sum(block_sizes)
            part = order[start : start + rows]
            outputs.append(bank(grouped[start : start + rows], block_sizes, None if context is None else context.select(part)))
            start += rows
        y = torch.cat(outputs)
        return torch.empty_like(y).index_copy(0, order, y)
