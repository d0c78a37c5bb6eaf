"""Patch-level self-supervision on exactly corresponding patches of two views.

An image-level objective (SimCLR, VICReg, ...) asks the pooled features to be
invariant, not the patch tokens; but a router decides per token, so its
decisions are only as stable as the tokens it sees. This objective asks the
tokens of corresponding patches (``ssroute.data.correspondence``: known
exactly from the views' transform matrices, not searched for) to agree, with
the local criterion of VICRegL (Bardes et al. 2022, arXiv 2210.01571) — the
VICReg invariance, variance and covariance terms over pairs of projected
tokens — or NT-Xent over the pairs (``loss="ntxent"``, a dense SimCLR as in
DenseCL, Wang et al. 2021, arXiv 2011.09157), both from lightly. VICRegL
matches patches by their locations on a grid; here the matches are exact.

With soft partners the partner token is the bilinear blend of the view-2
tokens around the exact mapped point (the same blend the routing consistency
uses), so a patch that falls between four view-2 patches is compared with
their blend rather than with one of them.

Shapes: tokens ``[batch, tokens, dim]`` per view; a correspondence holds
``neighbours``/``weights`` ``[batch, tokens, K]`` (K = 4 for soft partners, 1 for hard).

>>> import torch
>>> from ssroute.data.correspondence import Correspondence
>>> tokens = torch.randn(4, 9, 16)
>>> everyone = torch.arange(9).expand(4, 9)
>>> match = Correspondence(everyone, torch.ones(4, 9, dtype=torch.bool), torch.zeros(4, 9, 2))
>>> dense = DensePatchLoss(dim=16, hidden=32, out=8)
>>> bool(dense(tokens, tokens, match) < dense(tokens, tokens.roll(1, dims=1), match))
True
"""

from __future__ import annotations

import torch
from lightly.loss import NTXentLoss, VICRegLoss
from lightly.models.modules.heads import SimCLRProjectionHead, VicRegLLocalProjectionHead
from torch import Tensor, nn

from ssroute.data.correspondence import Correspondence, partner_blend
from ssroute.errors import ConfigError

LOSSES = ("vicreg", "ntxent")


class DensePatchLoss(nn.Module):
    """A token projector and the loss between projected tokens of corresponding patches.

    Args:
        dim: token width.
        hidden: projector hidden width.
        out: projector output width.
        loss: ``vicreg`` (VICRegL's local criterion: invariance, variance, covariance) or ``ntxent``.
        max_pairs: pairs per step, sampled at random when more are valid (bounds the cost of the loss).
        temperature: NT-Xent temperature.
        soft: compare with the blend of soft partners (grid correspondences); False = the containing patch.
    """

    def __init__(
        self, dim: int, hidden: int = 128, out: int = 64, loss: str = "vicreg", max_pairs: int = 1024, temperature: float = 0.2, soft: bool = True
    ) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ConfigError(f"dense.loss={loss!r} is unknown; choose one of {list(LOSSES)}.")
        if loss == "vicreg":
            self.head: nn.Module = VicRegLLocalProjectionHead(dim, hidden, out)
            # per-rank statistics: ranks hold different numbers of valid pairs, which a gather cannot join
            self.loss: nn.Module = VICRegLoss(gather_distributed=False)
        else:
            self.head = SimCLRProjectionHead(dim, hidden, out)
            self.loss = NTXentLoss(temperature=temperature, gather_distributed=False)
        self.max_pairs, self.soft = max_pairs, soft

    def forward(self, tokens1: Tensor, tokens2: Tensor, match: Correspondence) -> Tensor:
        """Loss between each valid view-1 token and its (blended) view-2 partner."""
        partners = partner_blend(tokens2, match, self.soft)  # [B, N, dim]
        rows = match.valid.nonzero(as_tuple=True)
        if rows[0].numel() < 2:  # nothing to compare (every patch left the other view)
            return tokens1.sum() * 0.0
        if rows[0].numel() > self.max_pairs:
            keep = torch.randperm(rows[0].numel(), device=tokens1.device)[: self.max_pairs]
            rows = (rows[0][keep], rows[1][keep])
        return self.loss(self.head(tokens1[rows]), self.head(partners[rows]))
