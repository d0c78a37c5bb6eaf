"""A random routing share: a fraction ``p`` of the tokens, drawn anew on every call, go to random experts.

The research notes observe that "random routing hurts performance (sometimes),
but too much destroys performance" and ask why. ``router.random_fraction=p``
interpolates between any sparse router (``p = 0``) and the ``random`` router
(``p = 1``): on each call (each training step, each evaluation forward) a
Bernoulli(p) draw from torch's global random stream — re-seeded per step by the
training loop, so runs stay reproducible and resumable — picks the tokens
whose learned assignments are replaced (``Routing.with_random_share``) by ``k`` random experts, each with
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
>>> mixed = learned.with_random_share(fraction=1.0, k=1)
>>> torch.equal(mixed.expert, random_experts(6, 4, 1).view(-1)), mixed.weight.tolist() == [1.0] * 6
(True, True)
>>> learned.with_random_share(fraction=0.0, k=1) is learned
True
"""

from __future__ import annotations

import torch
from torch import Tensor


def random_experts(rows: int, num_experts: int, k: int, seed: int = 0, device: torch.device | str | None = None) -> Tensor:
    """``[rows, k]`` distinct random experts per row from a generator seeded with ``seed`` on every call (the random router's draw)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(rows, num_experts, generator=generator).topk(k, dim=-1).indices.to(device)
