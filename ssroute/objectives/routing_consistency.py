"""Augmentation consistency on routing distributions: corresponding patches go to the same experts.

For each patch of view 1 with a partner in view 2 (``ssroute.data.correspondence``),
the router's distribution in view 1 is trained to predict a sharpened,
stop-gradient target made from its partner's distribution in view 2, and the
other way round — SwAV's swapped prediction (Caron et al. 2020, arXiv 2006.09882)
applied to routing. Consistency alone is met by sending every patch to one
expert, so targets are balanced: with ``balance="sinkhorn"`` they are
Sinkhorn-Knopp projections of the partner distributions onto equal expert
usage (SwAV's equipartition); with ``balance="sinkhorn_position"`` every patch
position of the grid is balanced on its own, so a target never depends on where
a patch is, only on what it shows; with ``balance="entropy"`` the loss adds the
negative entropy of mean expert usage.

Shapes: ``probs`` ``[batch, tokens, experts]`` per view; partners and masks ``[batch, tokens]``.
:func:`consistency_over_blocks` applies the loss to the routings of two views'
forwards (``ForwardAux.routings``), block by block.

>>> import torch
>>> probs = torch.softmax(torch.randn(2, 4, 3), dim=-1)
>>> everyone = torch.arange(4).expand(2, 4)
>>> valid = torch.ones(2, 4, dtype=torch.bool)
>>> loss = routing_consistency_loss(probs, probs, everyone, valid, everyone, valid)
>>> loss.ndim
0
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from ssroute.data.correspondence import Correspondence, partner_blend
from ssroute.objectives.routing_mutual_information import symmetric_mutual_information_loss
from ssroute.routing import Routing
from ssroute.routing.image import ImageRouting

EPS = 1e-8
BALANCES = ("sinkhorn", "sinkhorn_position", "entropy", "none")


def sharpen(probs: Tensor, temperature: float) -> Tensor:
    """``p^(1/T)`` renormalised: lower temperature, more confident targets."""
    logits = torch.log(probs.clamp_min(EPS)) / temperature
    return torch.softmax(logits, dim=-1)


@torch.no_grad()
def sinkhorn_targets(probs: Tensor, temperature: float, iterations: int = 30) -> Tensor:
    """``[rows, experts]`` -> targets whose expert marginals are equal (SwAV's Sinkhorn-Knopp).

    Runs in the log domain: sharpened router distributions are nearly one-hot,
    and in the linear domain their small entries underflow and a few iterations
    leave the targets as unbalanced as the router (measured: 3 linear-domain
    iterations kept a 0.43 usage share on one of 8 experts; 30 log-domain
    iterations bring it to 0.13-0.18).
    """
    # [experts, rows] layout: both reductions then run along contiguous memory or across whole rows,
    # where a logsumexp over the 8-wide expert axis of [rows, experts] is many times slower on CPU
    log_q = (torch.log(probs.float().clamp_min(EPS)) / temperature).t().contiguous()
    experts = log_q.shape[0]
    for _ in range(iterations):
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - math.log(experts)  # every expert gets rows/E of the mass
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True)  # every row is a distribution
    return log_q.exp().t().to(probs.dtype)


@torch.no_grad()
def position_sinkhorn_targets(probs: Tensor, valid: Tensor, temperature: float, iterations: int = 30) -> Tensor:
    """``[batch, positions, experts]`` -> targets with equal expert usage *at every position* (over the valid rows).

    Balancing each grid position on its own makes a token's position say nothing of its target expert, so a
    router that predicts the targets has to read the content: partitioning the patch grid no longer pays.

    >>> import torch
    >>> by_position = torch.eye(2).expand(6, 2, 2) * 0.98 + 0.01  # position 0 -> expert 0, position 1 -> expert 1
    >>> targets = position_sinkhorn_targets(by_position, torch.ones(6, 2, dtype=torch.bool), temperature=0.1)
    >>> targets.sum(dim=0).round(decimals=3).tolist()  # each position's mass split evenly over both experts
    [[3.0, 3.0], [3.0, 3.0]]
    """
    log_q = torch.log(probs.float().clamp_min(EPS)) / temperature
    experts = probs.shape[-1]
    outside = torch.where(valid, 0.0, float("-inf")).unsqueeze(-1)  # invalid rows take no mass
    share = torch.log(valid.sum(dim=0).clamp_min(1).float() / experts).unsqueeze(-1)  # [positions, 1]
    for _ in range(iterations):
        log_q = log_q - torch.logsumexp(log_q + outside, dim=0, keepdim=True) + share  # every expert gets its share at each position
        log_q = log_q - torch.logsumexp(log_q, dim=-1, keepdim=True)  # every row is a distribution
    return log_q.exp().to(probs.dtype)


def _swapped_cross_entropy(student: Tensor, partner_probs: Tensor, valid: Tensor, temperature: float, balance: str) -> Tensor:
    """Cross-entropy of ``student [batch, tokens, experts]`` rows to targets built from ``partner_probs``, their partners' distributions."""
    rows_student = student[valid]
    if rows_student.shape[0] == 0:
        return student.sum() * 0.0
    if balance == "sinkhorn_position":
        target = position_sinkhorn_targets(partner_probs.detach(), valid, temperature)[valid]
        return -(target * torch.log(rows_student.clamp_min(EPS))).sum(dim=-1).mean()
    rows_teacher = partner_probs[valid].detach()
    if balance == "sinkhorn":
        target = sinkhorn_targets(rows_teacher, temperature)
    else:
        target = sharpen(rows_teacher, temperature)
    return -(target * torch.log(rows_student.clamp_min(EPS))).sum(dim=-1).mean()


def batch_usage_entropy(probs: Tensor, mask: Tensor | None = None) -> Tensor:
    """Entropy of mean expert usage over the (masked) tokens, normalised to [0, 1]."""
    rows = probs.reshape(-1, probs.shape[-1]) if mask is None else probs[mask]
    usage = rows.mean(dim=0)
    entropy = -(usage * torch.log(usage.clamp_min(EPS))).sum()
    return entropy / torch.log(torch.tensor(float(probs.shape[-1])))


def routing_consistency_loss(
    probs1: Tensor,
    probs2: Tensor,
    partner12: Tensor,
    valid12: Tensor,
    partner21: Tensor,
    valid21: Tensor,
    temperature: float = 0.1,
    balance: str = "sinkhorn",
    entropy_weight: float = 1.0,
) -> Tensor:
    """Symmetric swapped-prediction loss between the routings of two views.

    Args:
        probs1: ``[batch, tokens, experts]`` routing distribution of view 1.
        probs2: ``[batch, tokens, experts]`` routing distribution of view 2.
        partner12: ``[batch, tokens]`` view-2 partner of each view-1 token; ``valid12`` its mask.
        partner21: ``[batch, tokens]`` view-1 partner of each view-2 token; ``valid21`` its mask.
        temperature: target sharpening temperature.
        balance: ``sinkhorn`` (balanced targets), ``entropy`` (minus usage entropy added) or ``none``.
        entropy_weight: weight of the usage-entropy term when ``balance="entropy"``.
    """
    return swapped_prediction(probs1, _gather(probs2, partner12), valid12, probs2, _gather(probs1, partner21), valid21, temperature, balance, entropy_weight)


def _gather(probs: Tensor, partner: Tensor) -> Tensor:
    return torch.gather(probs, 1, partner.unsqueeze(-1).expand(-1, -1, probs.shape[-1]))


def swapped_prediction(
    probs1: Tensor,
    partners1: Tensor,
    valid1: Tensor,
    probs2: Tensor,
    partners2: Tensor,
    valid2: Tensor,
    temperature: float = 0.1,
    balance: str = "sinkhorn",
    entropy_weight: float = 1.0,
) -> Tensor:
    """The symmetric loss given each token's partner distribution: ``partners1 [batch, tokens, experts]`` is the
    view-2 distribution paired with each view-1 token (a containing patch, or a blend of soft partners), and so on."""
    if balance not in BALANCES:
        from ssroute.errors import ConfigError

        raise ConfigError(f"routing consistency balance={balance!r} is unknown; choose one of {', '.join(BALANCES)}.")
    loss = 0.5 * (
        _swapped_cross_entropy(probs1, partners1, valid1, temperature, balance) + _swapped_cross_entropy(probs2, partners2, valid2, temperature, balance)
    )
    if balance == "entropy":
        loss = loss - entropy_weight * 0.5 * (batch_usage_entropy(probs1, valid1) + batch_usage_entropy(probs2, valid2))
    return loss


def image_routing_consistency_loss(
    probs1: Tensor,
    probs2: Tensor,
    temperature: float = 0.1,
    balance: str = "sinkhorn",
    entropy_weight: float = 1.0,
) -> Tensor:
    """The same swapped prediction for routers that route whole images: both views of an image are partners.

    Balanced targets equalise expert usage over the batch's images.

    >>> import torch
    >>> p = 0.1 + 0.7 * torch.eye(3).repeat(2, 1)  # 6 images, balanced over 3 experts
    >>> bool(image_routing_consistency_loss(p, p) < image_routing_consistency_loss(p, p.roll(1, dims=-1)))
    True

    Args:
        probs1: ``[batch, experts]`` routing distribution of each image in view 1.
        probs2: ``[batch, experts]`` the same images in view 2.
        temperature, balance, entropy_weight: as for :func:`routing_consistency_loss`.
    """
    itself = torch.zeros(probs1.shape[0], 1, dtype=torch.long, device=probs1.device)
    valid = torch.ones_like(itself, dtype=torch.bool)
    return routing_consistency_loss(
        probs1.unsqueeze(1),
        probs2.unsqueeze(1),
        itself,
        valid,
        itself,
        valid,
        temperature=temperature,
        balance=balance,
        entropy_weight=entropy_weight,
    )


def consistency_over_blocks(
    routings: tuple[dict[int, Routing], dict[int, Routing]],
    matches: tuple[Correspondence, Correspondence],
    blocks: Iterable[int],
    cfg,
    targets: tuple[dict[int, Routing], dict[int, Routing]] | None = None,
) -> Tensor | None:
    """Mean swapped-prediction loss over the routed ``blocks`` between two views' routings (None if none ran).

    Patches are partnered by ``matches`` — with ``cfg.partners == "soft"`` a patch's partner distribution
    is the bilinear blend of the other view's patches around the exact mapped point
    (:func:`~ssroute.data.correspondence.partner_blend`); routings of whole images (:class:`ImageRouting`)
    take the image-level variant, where the two views of an image are partners. ``cfg.loss`` picks the swapped
    prediction (``swapped``) or the mutual information of the pairs' experts (``mutual_information``,
    :mod:`ssroute.objectives.routing_mutual_information`). ``cfg``: ``loss``, ``temperature``,
    ``balance``, ``entropy_weight``, ``partners`` (``ssroute.config.ConsistencyConfig``). ``targets``: the
    routings the partners' distributions are read from (an EMA teacher's, for each view); None = ``routings``.
    """
    m12, m21 = matches
    options = {"temperature": cfg.temperature, "balance": cfg.balance, "entropy_weight": cfg.entropy_weight}
    batch = m12.partner.shape[0]
    targets = routings if targets is None else targets
    losses = []
    for block in blocks:
        if block not in routings[0] or block not in routings[1]:
            continue
        first, second = routings[0][block], routings[1][block]
        if isinstance(first, ImageRouting):
            losses.append(image_routing_consistency_loss(first.image_probs, second.image_probs, **options))
        else:
            probs1, probs2 = (r.probs.view(batch, -1, r.num_experts) for r in (first, second))
            target1, target2 = (r.probs.view(batch, -1, r.num_experts) for r in (targets[0][block], targets[1][block]))
            soft = getattr(cfg, "partners", "hard") == "soft"
            partners1, partners2 = partner_blend(target2, m12, soft), partner_blend(target1, m21, soft)
            if getattr(cfg, "loss", "swapped") == "mutual_information":
                losses.append(symmetric_mutual_information_loss(probs1, partners1, m12.valid, probs2, partners2, m21.valid))
            else:
                losses.append(swapped_prediction(probs1, partners1, m12.valid, probs2, partners2, m21.valid, **options))
    return torch.stack(losses).mean() if losses else None
