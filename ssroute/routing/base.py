"""The routing result as data, the router base class and the router registry.

Routing is data, execution is separate (as google-research/vmoe separates
routing tensors from dispatchers). A router maps tokens ``[tokens, dim]`` to a
:class:`Routing`; ``ssroute.moe.MoELayer`` executes it.

A sparse routing keeps its assignments as three 1-D tensors of equal length
``[pairs]`` — ``token``, ``expert``, ``weight`` — so top-k, expert choice, set
matching, hashing and dynamic k share one execution path. Soft MoE carries soft
``dispatch_weights`` / ``combine_weights`` ``[groups, group_tokens, experts,
slots]`` instead. Either form can produce the dense dispatch and combine tensors
``[tokens, experts, capacity]`` of the unified formulation of "Routers in Vision
Mixture of Experts" (Liu et al., arXiv 2401.15969), ``y = C · E(Dᵀ x)``; the
tests use that as the reference.

Tokens are routed in *groups*: contiguous runs of ``tokens_per_group`` tokens
(the MoE layer passes tokens per image), so capacity, expert choice, soft slots
and set matching act per image as in V-MoE.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ssroute.errors import ConfigError
from ssroute.registry import Registry, check_options
from ssroute.routing.capacity import bucket_positions
from ssroute.routing.random_share import random_experts


@dataclass
class Routing:
    """What a router decided, for ``T`` tokens and ``E`` experts.

    Attributes:
        probs: ``[tokens, experts]`` routing distribution, rows sum to 1 (what a
            routing-consistency loss compares between views).
        token, expert: ``[pairs]`` long tensors, the kept (token, expert) assignments.
        weight: ``[pairs]`` float, the combine weight of each kept assignment.
        aux_loss: scalar auxiliary loss (0 when the router has none).
        num_dropped: scalar long tensor, tokens with no kept assignment.
        tokens_per_group: tokens per routing group (per image in the MoE layer).
        capacity: per-(group, expert) buffer size the router enforced, or None.
        dispatch_weights, combine_weights: soft routings only,
            ``[groups, group_tokens, experts, slots]``.
    """

    probs: Tensor
    token: Tensor
    expert: Tensor
    weight: Tensor
    aux_loss: Tensor
    num_dropped: Tensor
    tokens_per_group: int
    capacity: int | None = None
    dispatch_weights: Tensor | None = None
    combine_weights: Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.probs.shape[0]

    @property
    def num_experts(self) -> int:
        return self.probs.shape[1]

    @property
    def num_groups(self) -> int:
        return self.num_tokens // self.tokens_per_group

    @property
    def is_soft(self) -> bool:
        return self.dispatch_weights is not None

    def load(self) -> Tensor:
        """``[experts]`` rows each expert processes (tokens, or slots for soft routings)."""
        if self.is_soft:
            slots = self.dispatch_weights.shape[-1] * self.num_groups
            return torch.full((self.num_experts,), slots, dtype=torch.long, device=self.probs.device)
        return torch.bincount(self.expert, minlength=self.num_experts)

    def experts_per_token(self) -> Tensor:
        """``[tokens]`` number of kept assignments of each token (its k)."""
        return torch.bincount(self.token, minlength=self.num_tokens)

    def group_loads(self) -> Tensor:
        """``[groups, experts]`` kept assignments per group and expert."""
        group = self.token // self.tokens_per_group
        flat = torch.bincount(group * self.num_experts + self.expert, minlength=self.num_groups * self.num_experts)
        return flat.view(self.num_groups, self.num_experts)

    def executed_mass(self) -> Tensor:
        """``[tokens, experts]`` combine weight each token receives from each expert: what was executed.

        Sparse routings sum the kept assignments' weights (zero rows for dropped
        tokens); soft routings sum each token's combine weights over an expert's slots.
        """
        if self.is_soft:
            return self.combine_weights.detach().sum(dim=-1).reshape(self.num_tokens, self.num_experts).float()
        mass = torch.zeros(self.num_tokens, self.num_experts, dtype=torch.float32, device=self.probs.device)
        return mass.index_put_((self.token, self.expert), self.weight.detach().float(), accumulate=True)

    def executed_top1(self) -> Tensor:
        """``[tokens]`` the expert with the largest executed combine weight, ``-1`` for tokens nothing executed.

        This, not ``probs.argmax``, is what routing agreement counts: for random
        routers ``probs`` is uniform, and for expert choice, set matching or
        capacity drops the executed expert is not the router's preference.
        """
        mass = self.executed_mass()
        return torch.where(mass.sum(dim=-1) > 0, mass.argmax(dim=-1), torch.full_like(mass[:, 0], -1, dtype=torch.long))

    def executed_distribution(self) -> Tensor:
        """``[tokens, experts]`` the executed combine mass normalised per token (zero rows for dropped tokens)."""
        mass = self.executed_mass()
        return mass / mass.sum(dim=-1, keepdim=True).clamp_min(1e-12)

    def detach(self) -> Routing:
        return replace(self, **{f.name: getattr(self, f.name).detach() for f in fields(self) if isinstance(getattr(self, f.name), Tensor)})

    def dispatch_combine(self, capacity: int | None = None) -> tuple[Tensor, Tensor]:
        """Dense dispatch and combine tensors ``[tokens, experts, capacity]``.

        Slot ``c`` of expert ``e`` for token ``t`` is the ``c``-th buffer row of
        expert ``e`` *within t's group*; view as ``[groups, group_tokens, experts,
        capacity]`` to execute per group. Sparse pairs take slots in pair order;
        pairs beyond ``capacity`` are dropped. ``capacity=None`` uses the
        router's capacity, or the largest (group, expert) load when it had none.
        """
        if self.is_soft:
            shape = (self.num_tokens, self.num_experts, -1)
            return self.dispatch_weights.reshape(shape), self.combine_weights.reshape(shape)
        group = self.token // self.tokens_per_group
        slot = bucket_positions(group * self.num_experts + self.expert, self.num_groups * self.num_experts)
        if capacity is None and self.capacity is not None:
            capacity = self.capacity
        elif capacity is None:  # no limit: the fullest buffer sets the size (a host sync; reference use only)
            capacity = int(slot.max().item()) + 1 if slot.numel() else 1
        keep = slot < capacity
        shape = (self.num_tokens, self.num_experts, capacity)
        dispatch = self.weight.new_zeros(shape)
        combine = self.weight.new_zeros(shape)
        index = (self.token[keep], self.expert[keep], slot[keep])
        dispatch = dispatch.index_put(index, torch.ones_like(self.weight[keep]))
        combine = combine.index_put(index, self.weight[keep])
        return dispatch, combine

    def with_random_share(
        self, fraction: float, k: int, seed: int = 0, per_token: bool = True, generator: torch.Generator | None = None
    ) -> Routing:
        """This routing with a Bernoulli(``fraction``) share of its tokens (of its groups when not ``per_token``) re-routed
        to ``k`` random experts of weight ``1 / k`` (:mod:`ssroute.routing.random_share`); itself when ``fraction`` is 0.
        The share is drawn from ``generator`` (a CPU generator) when given, else from torch's global stream on the device."""
        if fraction <= 0:
            return self
        device = self.probs.device
        size = 1 if per_token else self.tokens_per_group
        units = self.num_tokens // size
        draw = torch.rand(units, generator=generator).to(device) if generator is not None else torch.rand(units, device=device)
        chosen = (draw < fraction).repeat_interleave(size)  # [tokens]; rand < 1 always holds
        keep = (~chosen.index_select(0, self.token)).nonzero().squeeze(1)
        experts = random_experts(units, self.num_experts, k, seed, device).repeat_interleave(size, dim=0)  # [tokens, k]
        picked = chosen.nonzero().squeeze(1)
        token = torch.cat([self.token.index_select(0, keep), picked.repeat_interleave(k)])
        expert = torch.cat([self.expert.index_select(0, keep), experts.index_select(0, picked).reshape(-1)])
        weight = torch.cat([self.weight.index_select(0, keep), self.weight.new_full((picked.numel() * k,), 1.0 / k)])
        num_dropped = self.num_tokens - (torch.bincount(token, minlength=self.num_tokens) > 0).sum()
        return replace(self, token=token, expert=expert, weight=weight, num_dropped=num_dropped, capacity=None)


def sparse_routing(
    probs: Tensor,
    token: Tensor,
    expert: Tensor,
    weight: Tensor,
    tokens_per_group: int,
    aux_loss: Tensor | None = None,
    capacity: int | None = None,
) -> Routing:
    """Build a sparse :class:`Routing`, counting dropped tokens without a host sync."""
    covered = torch.bincount(token, minlength=probs.shape[0]) > 0
    num_dropped = probs.shape[0] - covered.sum()
    if aux_loss is None:
        aux_loss = probs.new_zeros(())
    return Routing(probs, token, expert, weight, aux_loss, num_dropped, tokens_per_group, capacity)


class Router(nn.Module):
    """Base class: ``router(tokens [tokens, dim], tokens_per_group) -> Routing``.

    Class attributes tell later stages how to treat a router: ``learned`` (its
    ``probs`` come from learned parameters — a consistency loss skips routers
    without), ``per_token`` (routes tokens, not whole images) and ``soft``.
    Calling a router runs ``forward`` and then, when ``random_fraction > 0``,
    re-routes that share of its tokens to random experts — once here, for
    every router (:mod:`ssroute.routing.random_share`).

    Args:
        dim: token width.
        num_experts: number of experts ``E``.
    """

    name: ClassVar[str] = "router"  # the registered name, set by register_router
    learned: ClassVar[bool] = True
    per_token: ClassVar[bool] = True
    soft: ClassVar[bool] = False
    # Routers that add ``expert_logit_offset`` ([experts], when set) to their logits before choosing:
    # structured pruning (ssroute.prune) masks experts out through it, -inf-like for a removed expert.
    maskable_experts: ClassVar[bool] = False
    expert_logit_offset: Tensor | None = None

    def __init__(self, dim: int, num_experts: int) -> None:
        super().__init__()
        if num_experts < 1:
            raise ConfigError(f"num_experts={num_experts} must be at least 1; set num_experts to a positive integer.")
        self.dim = dim
        self.num_experts = num_experts
        self.random_fraction = 0.0  # share of tokens sent to random experts on each call (set_random_fraction)

    def forward(self, tokens: Tensor, tokens_per_group: int | None = None) -> Routing:
        raise NotImplementedError

    def __call__(self, *args: Any, **kwargs: Any) -> Routing:
        """``forward``, then the random share (:mod:`ssroute.routing.random_share`) when ``random_fraction > 0``."""
        routing = super().__call__(*args, **kwargs)
        if self.random_fraction > 0:
            nominal = self.experts_per_token(routing.tokens_per_group)
            k = int(nominal) if nominal is not None and nominal == int(nominal) and nominal >= 1 else 1
            fixed = None if self.training else torch.Generator().manual_seed(0)  # evaluation: the same share on every call
            routing = routing.with_random_share(self.random_fraction, min(k, self.num_experts), per_token=self.per_token, generator=fixed)
        return routing

    def set_random_fraction(self, fraction: float) -> None:
        """Send a share ``fraction`` of the tokens (resampled on every call) to random experts; 0 = the router alone."""
        if not 0.0 <= fraction <= 1.0:
            raise ConfigError(f"router.random_fraction={fraction} must be between 0 and 1 (the share of tokens sent to random experts).")
        if fraction > 0 and self.soft:
            raise ConfigError(
                f"router.random_fraction={fraction} needs a router with discrete assignments; {self.name} mixes every token "
                "into every slot, so set random_fraction=0 or choose another router."
            )
        self.random_fraction = float(fraction)

    def group_size(self, tokens: Tensor, tokens_per_group: int | None) -> int:
        """Validate the input and return the group size (all tokens when None)."""
        if tokens.dim() != 2 or tokens.shape[1] != self.dim:
            raise ConfigError(f"router {self.name} expects tokens [tokens, {self.dim}], got {list(tokens.shape)}; flatten to [B*N, dim].")
        n = tokens.shape[0] if tokens_per_group is None else int(tokens_per_group)
        if n < 1 or tokens.shape[0] % n:
            raise ConfigError(f"tokens_per_group={tokens_per_group} does not divide the {tokens.shape[0]} tokens; pass tokens per image.")
        return n

    # --- k: top-k style routers override; a k schedule calls set_k during training.
    def set_k(self, k: int) -> None:
        raise ConfigError(f"router {self.name} has no k to set; use a top-k style router (token_choice, random, top_p, ...).")

    def experts_per_token(self, tokens_per_group: int) -> float | None:
        """Nominal expert rows computed per token (accounting); None when data-dependent."""
        return 1.0

    def flops_per_token(self, tokens_per_group: int) -> float:
        """Multiply-add FLOPs (×2) the routing decision costs per token."""
        return 2.0 * self.dim * self.num_experts


def check_k(router: str, k: int, num_experts: int, key: str = "k") -> int:
    if not 1 <= k <= num_experts:
        raise ConfigError(f"router {router}: {key}={k} must be between 1 and num_experts={num_experts}; lower {key} or add experts.")
    return int(k)


def check_capacity_factor(router: str, capacity_factor: float | None) -> float | None:
    if capacity_factor is not None and not capacity_factor > 0:
        raise ConfigError(
            f"router {router}: capacity_factor={capacity_factor} must be > 0; use a positive factor, or null for no capacity limit."
        )
    return capacity_factor


ROUTERS: Registry[type[Router]] = Registry("router")


def register_router(name: str) -> Callable[[type[Router]], type[Router]]:
    """Register a router class under ``name`` and record the name on the class."""

    def decorator(cls: type[Router]) -> type[Router]:
        cls.name = name
        return ROUTERS.register(name)(cls)

    return decorator


COMMON_OPTIONS = ("random_fraction",)  # options every router takes, applied by the base class rather than its constructor


def build_router(name: str, dim: int, num_experts: int, random_fraction: float = 0.0, **options: Any) -> Router:
    """Build a registered router by name, e.g. ``build_router("token_choice", dim=64, num_experts=8, k=2)``.

    ``random_fraction`` (any sparse router): the share of tokens, drawn anew on every call, sent to random experts.
    """
    cls = ROUTERS.get(name)
    check_options("router", name, cls, options, fixed=("dim", "num_experts"))
    router = cls(dim=dim, num_experts=num_experts, **options)
    router.set_random_fraction(random_fraction)
    return router
