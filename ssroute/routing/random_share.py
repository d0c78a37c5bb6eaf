"""A random routing share: a fraction ``p`` of the tokens, drawn anew on every call, go to random experts.

The research notes observe that "random routing hurts performance (sometimes),
but too much destroys performance" and ask why. ``router.random_fraction=p``
interpolates between any sparse router (``p = 0``) and the ``random`` router
(``p = 1``): on each call (each training step, each evaluation forward) a
Bernoulli(p) draw from torch's global random stream — re-seeded per step by the
training loop, so runs stay reproducible and resumable — picks the tokens
whose learned assignments are replaced by ``k`` random experts, each with
combine weight ``1 / k``: exactly the random router's assignment and weights
(:func:`random_experts`, the same seeded draw), so ``p = 1`` executes what
``router=random`` executes. ``k`` is the router's nominal experts per token
(its ``k``; 1 for routers whose k depends on the data or is fractional, such
as expert choice and dynamic k). In eval mode the share is drawn from a
generator seeded on every call, as the random router's experts are: an
evaluation routes the same inputs the same way every time, so the end of a run
and ``python -m ssroute.evaluate`` measure the same model.

What is kept: ``probs`` stays the learned distribution (so balance losses and
the routing-consistency loss still train the router on every token), and a
random token's pairs carry constant weights, so no task gradient reaches the
router through them. The random pairs ignore capacity, as the random router
has none, so the mixed routing reports ``capacity=None``. Routers that route
whole images (``per_token = False``) draw per routing group: a chosen image
sends all its tokens to the same random experts. Soft routings have no
assignments to replace and refuse ``p > 0``.

>>> import torch
>>> from ssroute.routing.base import sparse_routing
>>> learned = sparse_routing(torch.full((6, 4), 0.25), torch.arange(6), torch.zeros(6, dtype=torch.long), torch.ones(6), 3)
>>> mixed = with_random_share(learned, fraction=1.0, k=1)
>>> torch.equal(mixed.expert, random_experts(6, 4, 1).view(-1)), mixed.weight.tolist() == [1.0] * 6
(True, True)
>>> with_random_share(learned, fraction=0.0, k=1) is learned
True
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from ssroute.routing.base import Routing


def random_experts(rows: int, num_experts: int, k: int, seed: int = 0, device: torch.device | str | None = None) -> Tensor:
    """``[rows, k]`` distinct random experts per row from a generator seeded with ``seed`` on every call (the random router's draw)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(rows, num_experts, generator=generator).topk(k, dim=-1).indices.to(device)


def with_random_share(
    routing: Routing, fraction: float, k: int, seed: int = 0, per_token: bool = True, generator: torch.Generator | None = None
) -> Routing:
    """``routing`` with a Bernoulli(``fraction``) share of its tokens (of its groups when not ``per_token``) re-routed
    to ``k`` random experts of weight ``1 / k``; the same object when ``fraction`` is 0. The share is drawn from
    ``generator`` (a CPU generator) when given, else from torch's global stream on the routing's device."""
    if fraction <= 0:
        return routing
    device = routing.probs.device
    size = 1 if per_token else routing.tokens_per_group
    units = routing.num_tokens // size
    if generator is not None:
        draw = torch.rand(units, generator=generator).to(device)
    else:
        draw = torch.rand(units, device=device)  # resampled on every call
    chosen_unit = draw < fraction  # rand < 1 always holds
    chosen = chosen_unit.repeat_interleave(size)  # [tokens]
    keep = (~chosen.index_select(0, routing.token)).nonzero().squeeze(1)
    experts = random_experts(units, routing.num_experts, k, seed, device).repeat_interleave(size, dim=0)  # [tokens, k]
    picked = chosen.nonzero().squeeze(1)
    token = torch.cat([routing.token.index_select(0, keep), picked.repeat_interleave(k)])
    expert = torch.cat([routing.expert.index_select(0, keep), experts.index_select(0, picked).reshape(-1)])
    weight = torch.cat([routing.weight.index_select(0, keep), routing.weight.new_full((picked.numel() * k,), 1.0 / k)])
    num_dropped = routing.num_tokens - (torch.bincount(token, minlength=routing.num_tokens) > 0).sum()
    return replace(routing, token=token, expert=expert, weight=weight, num_dropped=num_dropped, capacity=None)
