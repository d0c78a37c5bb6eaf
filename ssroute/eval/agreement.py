"""Routing agreement between two views: do corresponding patches go to the same expert?

Per MoE block, over pairs of augmented views with known patch correspondences
(``ssroute.data.correspondence``), on **what was executed** — each token's
executed top-1 expert (:meth:`~ssroute.routing.Routing.executed_top1`, the
kept assignment with the largest combine weight), not the argmax of the
router's ``probs``, which for random routing is uniform and for expert choice,
set matching or capacity drops is not what ran:

- ``routing_agreement``: share of corresponding pairs with the same executed
  outcome in both views: the same top-1 expert, or dropped (nothing executed
  it, e.g. by capacity) in both;
- ``routing_dropped_pairs``: share of pairs in which either token was dropped;
- ``routing_agreement_chance``: ``sum_o u1[o] * u2[o]`` over the outcomes (each
  expert, and dropped) with ``u`` their shares among the paired patches of each
  view — the agreement that routing blind to the content would reach with the
  same usage and drop rate;
- ``routing_js``: mean Jensen-Shannon divergence (in bits, so in [0, 1])
  between the executed distributions (combine mass per expert) of pairs that
  were both executed (Lin 1991, "Divergence measures based on the Shannon entropy");
- ``expert_usage_entropy``: entropy of the experts' load (kept assignments),
  normalised to [0, 1] (1 = perfectly balanced); ``dead_experts``: experts that
  received no token.

Routings of whole images (``ImageRouting``) are compared per image: every
image is its own partner. Counts are tensors so they can be summed across ranks.

>>> import torch
>>> from ssroute.routing.base import sparse_routing
>>> experts = torch.arange(8) % 4  # [1 image x 8 tokens], tokens cycle through 4 experts
>>> routing = sparse_routing(torch.eye(4)[experts], torch.arange(8), experts, torch.ones(8), tokens_per_group=8)
>>> meter = RoutingAgreementMeter(num_experts=4)
>>> everyone, valid = torch.arange(8).unsqueeze(0), torch.ones(1, 8, dtype=torch.bool)
>>> meter.update(1, routing, routing, everyone, valid)
>>> stats = meter.compute()
>>> stats["block1/routing_agreement"], stats["block1/routing_agreement_chance"], stats["block1/expert_usage_entropy"]
(1.0, 0.25, 1.0)
>>> js_divergence(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])).item(), js_divergence(torch.tensor([0.5, 0.5]), torch.tensor([0.5, 0.5])).item()
(1.0, 0.0)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ssroute.routing import Routing
from ssroute.routing.image import ImageRouting


def js_divergence(p: Tensor, q: Tensor) -> Tensor:
    """Jensen-Shannon divergence in bits between distributions along the last axis: ``[..., E] x [..., E] -> [...]``.

    ``JS(p, q) = H(m) - (H(p) + H(q)) / 2`` with ``m = (p + q) / 2``; symmetric,
    0 iff ``p == q``, 1 for disjoint supports. Zero probabilities contribute 0.
    """
    p, q = p.double(), q.double()

    def entropy(x: Tensor) -> Tensor:
        return -torch.where(x > 0, x * torch.log2(x.clamp_min(1e-300)), torch.zeros_like(x)).sum(dim=-1)

    return (entropy((p + q) / 2) - (entropy(p) + entropy(q)) / 2).clamp_min(0.0)


def load_entropy(load: Tensor) -> float:
    """Entropy of a ``[experts]`` load distribution, normalised to [0, 1] (1 = balanced)."""
    share = load.double() / load.sum().clamp_min(1)
    share = share[share > 0]
    return float(-(share * share.log()).sum() / math.log(load.numel())) if load.numel() > 1 else 1.0


def executed_per_image(routing: Routing, batch: int) -> tuple[Tensor, Tensor]:
    """``([batch, units], [batch, units, E])``: executed top-1 (``-1`` = dropped) and executed distribution of each
    unit — a token, or for image routings the image itself (one unit per image)."""
    top1 = routing.executed_top1().view(batch, -1)
    dist = routing.executed_distribution().view(batch, top1.shape[1], -1)
    if isinstance(routing, ImageRouting):
        return top1[:, :1], dist[:, :1]
    return top1, dist


class RoutingAgreementMeter:
    """Accumulates agreement, usage and load counts per routed block.

    Args:
        num_experts: experts per MoE layer.
    """

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self.counts: dict[int, dict[str, Tensor]] = {}

    def update(self, block: int, routing1: Routing, routing2: Routing, partner12: Tensor, valid12: Tensor) -> None:
        """Add one pair of views of ``block``: the two routings, and each view-1 token's partner and mask ``[batch, tokens]``.

        Image routings ignore the partners: each image is paired with itself.
        """
        batch = partner12.shape[0]
        top1, dist1 = executed_per_image(routing1, batch)
        top2, dist2 = executed_per_image(routing2, batch)
        if isinstance(routing1, ImageRouting):
            partner12 = torch.zeros(batch, 1, dtype=torch.long, device=top1.device)
            valid12 = torch.ones_like(partner12, dtype=torch.bool)
        top2 = torch.gather(top2, 1, partner12)
        dist2 = torch.gather(dist2, 1, partner12.unsqueeze(-1).expand(-1, -1, dist2.shape[-1]))
        executed = (top1 >= 0) & (top2 >= 0)
        e = self.num_experts
        device = top1.device
        c = self.counts.setdefault(
            block,
            {
                **{k: torch.zeros((), dtype=torch.long, device=device) for k in ("agree", "pairs", "dropped")},
                **{k: torch.zeros(e + 1, dtype=torch.long, device=device) for k in ("usage1", "usage2")},
                "load": torch.zeros(e, dtype=torch.long, device=device),
                "js": torch.zeros((), dtype=torch.float64, device=device),
            },
        )
        both = valid12 & executed
        c["agree"] += ((top1 == top2) & valid12).sum()  # -1 == -1: dropped in both views is the same outcome
        c["pairs"] += valid12.sum()
        c["dropped"] += (valid12 & ~executed).sum()
        c["js"] += js_divergence(dist1, dist2)[both].sum()
        c["usage1"] += torch.bincount(top1[valid12] + 1, minlength=e + 1)  # outcome 0 = dropped, 1 + e = expert e
        c["usage2"] += torch.bincount(top2[valid12] + 1, minlength=e + 1)
        c["load"] += (routing1.load() + routing2.load()).long().to(device)

    def reduce(self, reduce_sum: Callable[[Tensor], Tensor]) -> None:
        """Sum the counts across ranks with ``reduce_sum`` (e.g. the strategy's all-reduce)."""
        for counts in self.counts.values():
            for key in counts:
                counts[key] = reduce_sum(counts[key])

    def compute(self) -> dict[str, float]:
        """Per-block metrics (``block{i}/...``) and their mean over blocks (plain keys; dead experts summed)."""
        out: dict[str, float] = {}
        for block, c in sorted(self.counts.items()):
            key = f"block{block}"
            pairs = max(int(c["pairs"]), 1)
            executed = max(int(c["pairs"]) - int(c["dropped"]), 1)
            u1, u2 = c["usage1"].double() / pairs, c["usage2"].double() / pairs
            out[f"{key}/routing_agreement"] = int(c["agree"]) / pairs
            out[f"{key}/routing_agreement_chance"] = float((u1 * u2).sum())
            out[f"{key}/routing_dropped_pairs"] = int(c["dropped"]) / pairs
            out[f"{key}/routing_js"] = float(c["js"]) / executed
            out[f"{key}/expert_usage_entropy"] = load_entropy(c["load"])
            out[f"{key}/dead_experts"] = float((c["load"] == 0).sum())
        if self.counts:
            blocks = [f"block{b}" for b in sorted(self.counts)]
            for metric in ("routing_agreement", "routing_agreement_chance", "routing_dropped_pairs", "routing_js", "expert_usage_entropy"):
                out[metric] = sum(out[f"{b}/{metric}"] for b in blocks) / len(blocks)
            out["dead_experts"] = sum(out[f"{b}/dead_experts"] for b in blocks)
        return out
