"""What a backbone forward returns besides its features: :class:`ForwardAux`.

Modules keep no per-step state for a training loop to read back (as
google-research/vmoe's routers return ``(dispatcher, metrics)``): the ViT's
forward gives ``(features, aux)``, and everything a loss, a log line or a
metric needs from inside the network is in ``aux`` — each routed block's
:class:`~ssroute.routing.Routing`, the :class:`~ssroute.patches.Patches` the
view took, and the auxiliary losses by name.

>>> import torch
>>> from ssroute.models.vit import ViT
>>> features, aux = ViT(image_size=8, channels=1, dim=16, depth=2, heads=2, patch_size=2)(torch.randn(3, 1, 8, 8))
>>> features.shape, aux.routings, sorted(aux.losses), tuple(aux.patches.centres.shape)
(torch.Size([3, 16]), {}, [], (3, 16, 2))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ssroute.patches.base import Patches
from ssroute.routing import Routing


@dataclass
class ForwardAux:
    """Everything a backbone forward computed besides the features.

    Attributes:
        routings: block index -> the routing of that block's MoE layer over the
            ``batch * tokens`` flat tokens (image by image).
        patches: the tokens' patches: centres ``[batch, tokens, 2]`` in view
            pixels, and for a halting selector the mask, pool weights and ponder cost.
        losses: auxiliary losses by name, each a scalar that joins the training
            loss: ``router_aux`` (the trainable MoE layers' balance and z losses),
            ``ponder`` (sequential patch selection), ``depth_ponder`` (ACT over depth).
        tokens: ``[batch, tokens, dim]`` after the last block that ran (before the pool's norm).
        block_tokens: ``[batch, tokens, dim]`` after each block that ran, when asked for.
        depth: routing over depth only (``model=vit_depth``, or a ``depth`` stage of a
            stack): this forward's choices (:class:`~ssroute.models.depth_router.DepthTrace`).
    """

    routings: dict[int, Routing] = field(default_factory=dict)
    patches: Patches | None = None
    losses: dict[str, Tensor] = field(default_factory=dict)
    tokens: Tensor | None = None
    block_tokens: list[Tensor] | None = None
    depth: Any = None

    def rows_per_token(self) -> dict[int, float]:
        """Expert rows computed per token by each routed block in this forward (its measured k)."""
        return {i: r.token.numel() / max(r.num_tokens, 1) for i, r in self.routings.items() if not r.is_soft}


def router_aux_loss(routings: dict[int, Routing], trainable_from: int = 0) -> dict[str, Tensor]:
    """``{"router_aux": sum of aux_loss}`` over the routed blocks at or after ``trainable_from`` ({} if none)."""
    losses = [r.aux_loss.float() for i, r in routings.items() if i >= trainable_from]
    return {"router_aux": torch.stack(losses).sum()} if losses else {}
