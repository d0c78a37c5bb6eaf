"""Routing analytics: what the routers of a trained stack do on a set of images.

Per MoE block, from the kept assignments of its :class:`~ssroute.routing.Routing`:
the load per expert, its normalised entropy, dead experts, the share of tokens
dropped by capacity (no kept assignment), the mean experts per token and, for
k > 1, the co-selection matrix ``[E, E]`` (share of tokens that use experts i
and j together; the diagonal is each expert's share of tokens). From each
token's top-1 expert (``ssroute.eval.fluctuation.top1_experts``: the heaviest
kept assignment, the router's argmax for dropped tokens):

- the class x expert matrix ``[classes, E]``: row c is the share of class c's
  tokens that go to each expert (rows sum to 1), summarised by the normalised
  mutual information ``NMI = 2 I(class; expert) / (H(class) + H(expert))``
  (0 = routing ignores the class, 1 = experts are the classes; scikit-learn's
  arithmetic NMI) and by purity (share of tokens whose expert's majority class
  is their class);
- the block-i x block-j matrix ``[E_i, E_j]`` for every pair of routing blocks:
  the joint share of tokens routed to expert a at block i and b at block j,
  summarised by the same NMI (1 = the later block repeats the earlier choice).

The functions over ``Routing`` objects are pure, so hand-made routings test
them; :func:`routing_analytics` only runs the backbone and collects them.

>>> import torch
>>> from ssroute.routing.base import sparse_routing
>>> # four tokens of one image with k = 2: tokens 0 and 1 use experts {0, 1}, tokens 2 and 3 use {1, 2}
>>> routing = sparse_routing(torch.full((4, 3), 1 / 3), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]),
...                          torch.tensor([0, 1, 0, 1, 1, 2, 1, 2]), torch.full((8,), 0.5), tokens_per_group=4)
>>> co_selection(routing).tolist()
[[0.5, 0.5, 0.0], [0.5, 1.0, 0.5], [0.0, 0.5, 0.5]]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ssroute.eval.agreement import load_entropy
from ssroute.eval.features import evaluating
from ssroute.eval.fluctuation import top1_experts
from ssroute.routing import Routing


@dataclass
class BlockRouting:
    """What one MoE block did with the analysed images."""

    load: Tensor  # [E] kept assignments (slots for soft routings) per expert
    top1: Tensor  # [tokens] each token's top-1 expert
    co_selection: Tensor | None  # [E, E] share of tokens using experts i and j together; None for soft routings
    class_expert: Tensor | None  # [classes, E] share of each class's tokens per expert; None without labels


@dataclass
class RoutingAnalytics:
    blocks: dict[str, BlockRouting] = field(default_factory=dict)  # "block2" -> its analytics, in block order
    cross_block: dict[tuple[str, str], Tensor] = field(default_factory=dict)  # (block i, block j), i < j -> [E_i, E_j] joint share
    metrics: dict[str, float] = field(default_factory=dict)  # flat block{i}/... keys (see analyse_routings)


def co_selection(routing: Routing) -> Tensor:
    """``[E, E]`` share of tokens whose kept experts include both i and j (diagonal: share of tokens using i)."""
    chosen = torch.zeros(routing.num_tokens, routing.num_experts, dtype=torch.float64, device=routing.probs.device)
    chosen[routing.token, routing.expert] = 1.0
    return chosen.T @ chosen / max(routing.num_tokens, 1)


def joint_counts(a: Tensor, b: Tensor, size_a: int, size_b: int) -> Tensor:
    """``[size_a, size_b]`` how often each (a, b) pair occurs in the paired 1-D integer tensors ``a``, ``b``."""
    return torch.bincount(a.long() * size_b + b.long(), minlength=size_a * size_b).view(size_a, size_b).double()


def normalized_mutual_information(counts: Tensor) -> float:
    """Arithmetic NMI ``2 I(A; B) / (H(A) + H(B))`` of a joint count matrix; 0 when both marginals are constant."""
    joint = counts.double() / counts.sum().clamp_min(1)
    pa, pb = joint.sum(1), joint.sum(0)

    def entropy(p: Tensor) -> Tensor:
        p = p[p > 0]
        return -(p * p.log()).sum()

    nonzero = joint > 0
    mutual = (joint[nonzero] * (joint[nonzero] / (pa[:, None] * pb[None, :])[nonzero]).log()).sum()
    denominator = entropy(pa) + entropy(pb)
    return float(2 * mutual / denominator) if denominator > 0 else 0.0


def purity(counts: Tensor) -> float:
    """Share of items whose column's (expert's) majority row (class) is their own row: ``sum_e max_c n[c, e] / n``."""
    return float(counts.max(dim=0).values.sum() / counts.sum().clamp_min(1))


def image_top1(routing: Routing, images: int) -> Tensor:
    """``[images]`` the top-1 expert of each image's mean routing distribution."""
    return routing.probs.detach().view(images, -1, routing.num_experts).mean(dim=1).argmax(dim=-1)


def analyse_routings(
    routings: dict[int, Routing], images: int, labels: Tensor | None = None, num_classes: int | None = None
) -> RoutingAnalytics:
    """Analytics of the routings of MoE blocks (by block index) over the same ``images`` images.

    Each routing holds ``tokens_per_image * images`` rows, image by image.
    ``labels [images]`` (``-1`` = unlabelled, ignored) may be None, which skips
    the class x expert matrices.
    Metrics per block: ``load_max_share`` (the busiest expert's share of the
    load; 1/E is balanced), ``dropped_share``, ``unaugmented_usage_entropy`` and ``unaugmented_dead_experts`` (on these images;
    expert usage under the run's augmentation is ``ssroute.eval.agreement``'s), ``experts_per_token``, ``class_expert_nmi``,
    ``class_expert_purity``; per block pair ``block{i}/block{j}/expert_nmi``.
    """
    result = RoutingAnalytics()
    keyed = [(f"block{i}", r) for i, r in sorted(routings.items())]
    for block, routing in keyed:
        load = routing.load().cpu()
        top1 = top1_experts(routing).cpu()
        class_expert = None
        m = result.metrics
        m[f"{block}/load_max_share"] = float(load.max() / load.sum().clamp_min(1))
        m[f"{block}/dropped_share"] = float(routing.num_dropped) / max(routing.num_tokens, 1)
        m[f"{block}/unaugmented_usage_entropy"] = load_entropy(load)
        m[f"{block}/unaugmented_dead_experts"] = float((load == 0).sum())
        m[f"{block}/experts_per_token"] = routing.token.numel() / max(routing.num_tokens, 1) if not routing.is_soft else float("nan")
        if labels is not None and num_classes:
            token_labels = labels.cpu().long().repeat_interleave(routing.num_tokens // images)
            known = token_labels >= 0
            if known.any():
                counts = joint_counts(token_labels[known], top1[known], num_classes, routing.num_experts)
                class_expert = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
                m[f"{block}/class_expert_nmi"] = normalized_mutual_information(counts)
                m[f"{block}/class_expert_purity"] = purity(counts)
        co = None if routing.is_soft else co_selection(routing).cpu()
        result.blocks[block] = BlockRouting(load, top1, co, class_expert)
    for i, (block_i, routing_i) in enumerate(keyed):
        for block_j, routing_j in keyed[i + 1 :]:
            a, b = result.blocks[block_i].top1, result.blocks[block_j].top1
            if a.numel() != b.numel():  # an image-level block: compare the images' choices
                a, b = image_top1(routing_i, images).cpu(), image_top1(routing_j, images).cpu()
            counts = joint_counts(a, b, routing_i.num_experts, routing_j.num_experts)
            result.cross_block[(block_i, block_j)] = counts / counts.sum().clamp_min(1)
            result.metrics[f"{block_i}/{block_j}/expert_nmi"] = normalized_mutual_information(counts)
    return result


def concat_routings(parts: list[Routing]) -> Routing:
    """One :class:`Routing` of several forwards' routings (token indices offset, groups stacked)."""
    first = parts[0]
    offsets = torch.tensor([0] + [p.num_tokens for p in parts[:-1]], device=first.probs.device).cumsum(0)
    soft = first.is_soft
    return Routing(
        probs=torch.cat([p.probs for p in parts]),
        token=torch.cat([p.token + int(o) for p, o in zip(parts, offsets, strict=True)]),
        expert=torch.cat([p.expert for p in parts]),
        weight=torch.cat([p.weight for p in parts]),
        aux_loss=torch.stack([p.aux_loss.float() for p in parts]).mean(),
        num_dropped=torch.stack([torch.as_tensor(p.num_dropped) for p in parts]).sum(),
        tokens_per_group=first.tokens_per_group,
        capacity=first.capacity,
        dispatch_weights=torch.cat([p.dispatch_weights for p in parts]) if soft else None,
        combine_weights=torch.cat([p.combine_weights for p in parts]) if soft else None,
    )


def routing_analytics(
    backbone: nn.Module, images_normalised: Tensor, labels: Tensor | None, num_classes: int | None, batch_size: int = 256
) -> RoutingAnalytics:
    """Run ``backbone`` (in eval mode) over ``images_normalised [images, C, H, W]`` and analyse every MoE block.

    A backbone without MoE layers gives empty analytics. See :func:`analyse_routings` for the metrics.
    """
    parts: dict[int, list[Routing]] = {}
    with evaluating(backbone):
        for chunk in images_normalised.split(batch_size):
            _, aux = backbone(chunk)
            for block, routing in aux.routings.items():
                parts.setdefault(block, []).append(routing.detach())
    if not parts:
        return RoutingAnalytics()
    return analyse_routings({i: concat_routings(r) for i, r in parts.items()}, images_normalised.shape[0], labels, num_classes)
