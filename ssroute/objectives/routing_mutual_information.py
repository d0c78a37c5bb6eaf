"""Routing consistency as mutual information between the experts of corresponding patches (IIC).

Invariant Information Clustering (Ji et al. 2019, arXiv 1807.06653) trains a
soft clustering by maximising the mutual information between the cluster
assignments of two transformed views, ``I(z, z') = H(z) - H(z | z')``: the
first term asks for balanced clusters, the second for assignments one view
predicts in the other — routing consistency and balance in one term, with no
targets to build. IIC's segmentation variant pairs the pixels that a
transform maps onto each other; here the pairs are corresponding patches
(``ssroute.data.correspondence``), and the clusters are experts.

For ``n`` valid pairs with routing distributions ``p_i`` (view 1) and ``q_i``
(its partner in view 2), the joint distribution of the two experts is
``P = (1/n) sum_i p_i q_iᵀ``, symmetrised, and the loss is ``-I(P)`` in nats
(0 for routing blind to the content; at best ``-log E`` for balanced,
perfectly consistent routing). Gradients flow through both views.

>>> import torch
>>> confident = torch.eye(4).repeat(3, 1) * 0.97 + 0.01  # 12 tokens, balanced over 4 experts
>>> valid = torch.ones(12, dtype=torch.bool)
>>> same = mutual_information_loss(confident, confident, valid)
>>> round(same.item(), 2), bool(same < mutual_information_loss(confident, confident.roll(1, dims=0), valid))
(-1.1, True)
"""

from __future__ import annotations

from torch import Tensor

EPS = 1e-8


def mutual_information_loss(probs: Tensor, partners: Tensor, valid: Tensor) -> Tensor:
    """``-I`` between the experts of ``probs [..., experts]`` and their ``partners [..., experts]`` over the ``valid [...]`` pairs."""
    p, q = probs[valid].float(), partners[valid].float()
    if p.shape[0] == 0:
        return probs.sum() * 0.0
    joint = p.t() @ q / p.shape[0]  # [experts, experts]
    joint = ((joint + joint.t()) / 2).clamp_min(EPS)
    marginal = joint.sum(dim=1)
    return -(joint * (joint.log() - marginal.log()[:, None] - marginal.log()[None, :])).sum()


def symmetric_mutual_information_loss(probs1: Tensor, partners1: Tensor, valid1: Tensor, probs2: Tensor, partners2: Tensor, valid2: Tensor) -> Tensor:
    """The mean of the loss from view 1's patches to their view-2 partners and from view 2's to view 1's."""
    return 0.5 * (mutual_information_loss(probs1, partners1, valid1) + mutual_information_loss(probs2, partners2, valid2))
