"""Routing stability under augmentation: do corresponding patches of two views go to the same expert?

Per MoE block, over pairs of augmented views with known patch correspondences
(``ssroute.data.correspondence``):

- ``routing_agreement``: share of corresponding patch pairs whose top-1 expert
  is the same in both views;
- ``routing_agreement_chance``: ``sum_e u1[e] * u2[e]`` with ``u`` the top-1
  usage of the paired patches in each view — the agreement routing that ignores
  the image content would reach with the same usage;
- ``routing_js``: mean Jensen-Shannon divergence (in bits, so in [0, 1])
  between the routing distributions of corresponding patches — 0 when they
  route identically, also below the top-1 level (Lin 1991, "Divergence
  measures based on the Shannon entropy");
- ``expert_usage_entropy``: entropy of the experts' load (kept assignments),
  normalised to [0, 1] (1 = perfectly balanced);
- ``dead_experts``: experts that received no token.

Counts are accumulated as tensors so they can be summed across ranks.

>>> import torch
>>> probs = torch.eye(4).repeat(1, 2, 1)  # [1 image, 8 tokens, 4 experts], tokens cycle through experts
>>> meter = RoutingStabilityMeter(num_experts=4)
>>> everyone, valid = torch.arange(8).unsqueeze(0), torch.ones(1, 8, dtype=torch.bool)
>>> meter.update("blocks.1", probs, probs, everyone, valid, torch.full((4,), 4))
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


def js_divergence(p: Tensor, q: Tensor) -> Tensor:
    """Jensen-Shannon divergence in bits between distributions along the last axis: ``[..., E] x [..., E] -> [...]``.

    ``JS(p, q) = H(m) - (H(p) + H(q)) / 2`` with ``m = (p + q) / 2``; symmetric,
    0 iff ``p == q``, 1 for disjoint supports. Zero probabilities contribute 0.
    """
    p, q = p.double(), q.double()

    def entropy(x: Tensor) -> Tensor:
        return -torch.where(x > 0, x * torch.log2(x.clamp_min(1e-300)), torch.zeros_like(x)).sum(dim=-1)

    return (entropy((p + q) / 2) - (entropy(p) + entropy(q)) / 2).clamp_min(0.0)


def block_key(layer_name: str) -> str:
    """``"blocks.2.ffn" -> "block2"`` (the index of the transformer block an MoE layer sits in)."""
    return f"block{layer_name.split('.')[1]}" if layer_name.startswith("blocks.") else f"block{layer_name}"


class RoutingStabilityMeter:
    """Accumulates agreement, usage and load counts per MoE block.

    Args:
        num_experts: experts per MoE layer.
    """

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self.counts: dict[str, dict[str, Tensor]] = {}

    def update(self, name: str, probs1: Tensor, probs2: Tensor, partner12: Tensor, valid12: Tensor, load: Tensor) -> None:
        """Add one pair of views: ``probs`` ``[batch, tokens, experts]``, partners/mask ``[batch, tokens]``, ``load [experts]``."""
        top1 = probs1.argmax(dim=-1)
        top2 = torch.gather(probs2.argmax(dim=-1), 1, partner12)
        probs2 = torch.gather(probs2, 1, partner12.unsqueeze(-1).expand(-1, -1, probs2.shape[-1]))
        e = self.num_experts
        c = self.counts.setdefault(
            name,
            {
                "agree": torch.zeros((), dtype=torch.long, device=probs1.device),
                "pairs": torch.zeros((), dtype=torch.long, device=probs1.device),
                "usage1": torch.zeros(e, dtype=torch.long, device=probs1.device),
                "usage2": torch.zeros(e, dtype=torch.long, device=probs1.device),
                "load": torch.zeros(e, dtype=torch.long, device=probs1.device),
                "js": torch.zeros((), dtype=torch.float64, device=probs1.device),
            },
        )
        c["agree"] += ((top1 == top2) & valid12).sum()
        c["pairs"] += valid12.sum()
        c["js"] += js_divergence(probs1, probs2)[valid12].sum()
        c["usage1"] += torch.bincount(top1[valid12], minlength=e)
        c["usage2"] += torch.bincount(top2[valid12], minlength=e)
        c["load"] += load.long().to(c["load"].device)

    def reduce(self, reduce_sum: Callable[[Tensor], Tensor]) -> None:
        """Sum the counts across ranks with ``reduce_sum`` (e.g. the strategy's all-reduce)."""
        for counts in self.counts.values():
            for key in counts:
                counts[key] = reduce_sum(counts[key])

    def compute(self) -> dict[str, float]:
        """Per-block metrics (``block{i}/...``) and their mean over blocks (plain keys; dead experts summed)."""
        out: dict[str, float] = {}
        for name, c in self.counts.items():
            block = block_key(name)
            pairs = max(int(c["pairs"]), 1)
            u1, u2 = c["usage1"].double() / pairs, c["usage2"].double() / pairs
            load = c["load"].double() / c["load"].sum().clamp_min(1)
            entropy = -(load[load > 0] * load[load > 0].log()).sum() / math.log(self.num_experts)
            out[f"{block}/routing_agreement"] = int(c["agree"]) / pairs
            out[f"{block}/routing_agreement_chance"] = float((u1 * u2).sum())
            out[f"{block}/routing_js"] = float(c["js"]) / pairs
            out[f"{block}/expert_usage_entropy"] = float(entropy)
            out[f"{block}/dead_experts"] = float((c["load"] == 0).sum())
        if self.counts:
            blocks = sorted({k.split("/")[0] for k in out})
            for metric in ("routing_agreement", "routing_agreement_chance", "routing_js", "expert_usage_entropy"):
                out[metric] = sum(out[f"{b}/{metric}"] for b in blocks) / len(blocks)
            out["dead_experts"] = sum(out[f"{b}/dead_experts"] for b in blocks)
        return out
