"""The MoE layer: a drop-in FFN ``[batch, tokens, dim] -> [batch, tokens, dim]``.

It routes the flattened tokens per image (``tokens_per_group = tokens``) and
executes the :class:`~ssroute.routing.Routing`:

- sparse routings sort the (token, expert) pairs by expert, gather the tokens,
  run each expert once on its contiguous block, weight the outputs and bring
  them back to their tokens (:mod:`ssroute.moe.dispatch`: a gather when each
  token has at most one expert, ``index_add`` otherwise) — no per-token loop and
  no ``[tokens, experts, capacity]`` one-hot (that is :func:`dense_reference`,
  the V-MoE dispatch the tests compare against);
- soft routings (Soft MoE, Puigcerver et al. 2023) mix tokens into slots with
  the dispatch weights and slots back into tokens with the combine weights.

A token with no kept assignment gets output 0, so the block's residual carries
it. The layer keeps no per-step state: :meth:`MoELayer.forward_with_routing`
returns the :class:`~ssroute.routing.Routing` next to the output (its
``aux_loss``, ``load()``, ``probs``), which is what the backbone hands up to the
training loop; :meth:`MoELayer.forward` is the plain drop-in FFN.

Routing groups are ``group_images`` images (1: per image, as V-MoE's default
group of one image's tokens): capacity, batch priority, expert choice, soft
slots, set matching and the balance losses act within a group. A batch that
``group_images`` does not divide is grouped by its largest divisor below it
(:func:`images_per_group`).

>>> import torch
>>> moe = build_moe(dim=16, hidden=32, num_experts=4, router="token_choice", k=2)
>>> y, routing = moe.forward_with_routing(torch.randn(2, 5, 16))
>>> y.shape, routing.load().shape, moe(torch.randn(2, 5, 16)).shape
(torch.Size([2, 5, 16]), torch.Size([4]), torch.Size([2, 5, 16]))
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ssroute.errors import ConfigError
from ssroute.experts import EXPERTS, ExpertBank, ExpertContext, build_experts
from ssroute.moe.dispatch import combine, dispatch, plan_dispatch
from ssroute.registry import option_names
from ssroute.routing import COMMON_OPTIONS, ROUTERS, Router, Routing, build_router


class MoELayer(nn.Module):
    """Router + expert bank.

    Args:
        router: a :class:`~ssroute.routing.Router`.
        experts: an :class:`~ssroute.experts.ExpertBank` with as many experts.
        group_images: images per routing group (capacity and balance act per group).
        router_context: share of each token's router input taken from its image's mean token,
            ``(1 - c) x + c mean(x)``: 0 = the token alone; more = decisions that the image's
            content as a whole informs (the experts still run on the token itself).
    """

    def __init__(self, router: Router, experts: ExpertBank, group_images: int = 1, router_context: float = 0.0) -> None:
        super().__init__()
        if router.num_experts != experts.num_experts or router.dim != experts.dim:
            raise ConfigError(
                f"router has dim={router.dim}, num_experts={router.num_experts} but the experts have "
                f"dim={experts.dim}, num_experts={experts.num_experts}; build both with the same values."
            )
        if group_images < 1:
            raise ConfigError(f"group_images={group_images} must be a positive number of images per routing group.")
        if not 0.0 <= router_context <= 1.0:
            raise ConfigError(f"router_context={router_context} must be in [0, 1] (0 = each token routes on itself).")
        self.router_context = router_context
        self.router = router
        self.experts = experts
        self.num_experts = experts.num_experts
        self.group_images = group_images

    def set_k(self, k: int) -> None:
        """Change experts per token (top-k routers) or the cap ``max_k`` (dynamic k)."""
        self.router.set_k(k)

    def forward(self, x: Tensor) -> Tensor:
        """``[batch, tokens, dim] -> [batch, tokens, dim]``: the drop-in FFN (the routing is discarded)."""
        return self.forward_with_routing(x)[0]

    def forward_with_routing(self, x: Tensor) -> tuple[Tensor, Routing]:
        """``[batch, tokens, dim] -> ([batch, tokens, dim], Routing of the batch * tokens flat tokens)``."""
        batch, tokens, dim = x.shape
        flat = x.reshape(batch * tokens, dim)
        group = tokens * images_per_group(batch, self.group_images)
        router_in = flat
        if self.router_context:
            router_in = torch.lerp(x, x.mean(dim=1, keepdim=True), self.router_context).reshape(batch * tokens, dim)
        routing = self.router(router_in, tokens_per_group=group)
        return self.execute(flat, routing).view(batch, tokens, dim), routing

    def execute(self, flat: Tensor, routing: Routing) -> Tensor:
        """Apply the experts to ``flat [tokens, dim]`` as ``routing`` says."""
        if routing.is_soft:
            return self._execute_soft(flat, routing)
        plan = plan_dispatch(routing.token, routing.expert, flat.shape[0], self.num_experts)
        context = ExpertContext(plan.row_token, routing.tokens_per_group, routing.num_groups)
        y = self.experts(dispatch(flat, plan), plan.sizes, context)
        return combine(y, routing.weight, plan, flat.shape[0])

    def _execute_soft(self, flat: Tensor, routing: Routing) -> Tensor:
        groups, n, experts, slots = routing.dispatch_weights.shape
        x = flat.view(groups, n, -1)
        slot_in = torch.einsum("gnes,gnd->egsd", routing.dispatch_weights, x)
        slot_image = torch.arange(groups, device=flat.device).repeat_interleave(slots).repeat(experts)
        context = ExpertContext(None, n, groups, slot_image)
        y = self.experts(slot_in.reshape(experts * groups * slots, -1), [groups * slots] * experts, context)
        out = torch.einsum("gnes,egsd->gnd", routing.combine_weights, y.view(experts, groups, slots, -1))
        return out.reshape(flat.shape)

    def rows_per_token(self, tokens_per_image: int, measured: float | None = None) -> float:
        """Expert rows computed per token: the router's nominal value, else ``measured`` (from a routing), else ``k``."""
        nominal = self.router.experts_per_token(tokens_per_image * self.group_images)
        if nominal is not None:
            return float(nominal)
        if measured is not None:
            return float(measured)
        return float(getattr(self.router, "k", 1))

    def accounting(self, tokens_per_image: int, measured_rows: float | None = None) -> dict[str, float]:
        """Parameters and per-token FLOPs of this layer (see ``ssroute.moe.accounting``); ``measured_rows``:
        expert rows per token seen in a real forward, for routers whose k depends on the data.

        Per expert type ``experts/<type>/params`` and ``experts/<type>/flops_per_token`` (a type's share of the
        rows is its share of the experts: equal load) sum to ``params_experts`` and ``flops_experts_per_token``."""
        rows = self.rows_per_token(tokens_per_image, measured_rows)
        router_params = sum(p.numel() for p in self.router.parameters())
        expert_params = sum(p.numel() for p in self.experts.parameters())
        active_experts = self.num_experts if self.router.soft else min(float(self.num_experts), rows)
        active_expert_params = self.experts.shared_params() + active_experts * self.experts.params_per_expert()
        expert_flops = rows * self.experts.flops_per_row(tokens_per_image)
        stats = {
            "params_total": float(router_params + expert_params),
            "params_active": float(router_params + active_expert_params),
            "params_experts": float(expert_params),
            "flops_per_token": self.router.flops_per_token(tokens_per_image) + expert_flops,
            "flops_experts_per_token": expert_flops,
        }
        for name, cost in self.experts.type_costs(tokens_per_image).items():  # a type's rows: its share of the experts
            stats[f"experts/{name}/params"] = cost.params
            stats[f"experts/{name}/flops_per_token"] = rows * cost.experts / self.num_experts * cost.flops_per_row
        return stats


def dense_reference(experts: ExpertBank, flat: Tensor, routing: Routing, capacity: int | None = None) -> Tensor:
    """The unified formulation ``y = C · E(Dᵀ x)`` with dense ``[tokens, experts, capacity]`` tensors.

    V-MoE's one-hot einsum dispatch; the tests' reference for every router and
    the benchmark's baseline. Empty buffer slots run through the experts too
    (their combine weight is 0), as in a dense dispatch; the context marks them
    (``valid`` False) so experts that look at other rows (attention, conv) leave
    them out.
    """
    dispatch, combine = routing.dispatch_combine(capacity)
    groups, n = routing.num_groups, routing.tokens_per_group
    experts_, slots = dispatch.shape[1], dispatch.shape[2]
    dispatch = dispatch.view(groups, n, experts_, slots).to(flat.dtype)
    combine = combine.view(groups, n, experts_, slots).to(flat.dtype)
    x = flat.view(groups, n, -1)
    buffers = torch.einsum("gnec,gnd->egcd", dispatch, x)
    if routing.is_soft:  # slots are no tokens: the context the layer's soft path gives
        context = ExpertContext(None, n, groups, torch.arange(groups, device=flat.device).repeat_interleave(slots).repeat(experts_))
    else:  # the token occupying each slot; empty slots (any token of the group) are marked invalid
        occupant = dispatch.argmax(dim=1).permute(1, 0, 2) + torch.arange(groups, device=flat.device).view(1, groups, 1) * n
        valid = (dispatch.sum(dim=1) > 0).permute(1, 0, 2)
        context = ExpertContext(occupant.reshape(-1), n, groups, valid=valid.reshape(-1))
    y = experts(buffers.reshape(experts_ * groups * slots, -1), [groups * slots] * experts_, context)
    out = torch.einsum("gnec,egcd->gnd", combine, y.view(experts_, groups, slots, -1))
    return out.reshape(flat.shape)


def images_per_group(batch: int, group_images: int) -> int:
    """Images per routing group for a batch: ``group_images``, or for a batch it does not divide (the last
    batch of an evaluation) the largest divisor of the batch below it, so groups stay near the asked size.

    >>> images_per_group(256, 64), images_per_group(104, 64), images_per_group(7, 64), images_per_group(67, 64)
    (64, 52, 7, 1)
    """
    return next(g for g in range(min(group_images, batch), 0, -1) if batch % g == 0)


def build_moe(
    dim: int,
    hidden: int,
    num_experts: int,
    router: str = "token_choice",
    experts: str = "mlp",
    router_options: dict[str, Any] | None = None,
    expert_options: dict[str, Any] | None = None,
    group_images: int = 1,
    router_context: float = 0.0,
    **options: Any,
) -> MoELayer:
    """Build an MoE layer; each keyword option goes to the router or the experts, by name.

    ``hidden`` is one expert's hidden width, so ``k=1`` has the active size of
    a dense FFN of that width. Options valid for both (none today) must be
    passed in ``router_options`` / ``expert_options``.
    """
    router_cls, expert_cls = ROUTERS.get(router), EXPERTS.get(experts)
    router_keys = set(option_names(router_cls, ("dim", "num_experts"))) | set(COMMON_OPTIONS)
    expert_keys = set(option_names(expert_cls, ("dim", "hidden", "num_experts")))
    router_opts, expert_opts = dict(router_options or {}), dict(expert_options or {})
    for key, value in options.items():
        if key in router_keys and key in expert_keys:
            raise ConfigError(
                f"option {key!r} fits both router {router!r} and experts {experts!r}; pass it in router_options or expert_options."
            )
        if key in router_keys:
            router_opts[key] = value
        elif key in expert_keys:
            expert_opts[key] = value
        else:
            raise ConfigError(
                f"MoE option {key!r} is valid for neither router {router!r} (options: {', '.join(sorted(router_keys)) or 'none'}) "
                f"nor experts {experts!r} (options: {', '.join(sorted(expert_keys)) or 'none'}); remove or rename it."
            )
    return MoELayer(
        build_router(router, dim=dim, num_experts=num_experts, **router_opts),
        build_experts(experts, dim=dim, hidden=hidden, num_experts=num_experts, **expert_opts),
        group_images=group_images,
        router_context=router_context,
    )
