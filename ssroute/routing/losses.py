"""Auxiliary router losses, as pure functions of routing tensors.

- importance and load losses of V-MoE (Riquelme et al. 2021, appendix A; after
  Shazeer et al. 2017): squared coefficient of variation of per-expert
  importance (summed probabilities) and of the probability that an expert is
  selected under the gating noise;
- the Switch Transformer balance loss (Fedus et al. 2021), used as the load
  loss when there is no gating noise;
- the router z-loss of ST-MoE (Zoph et al. 2022);
- the entropy ("dynamic") loss of top-p routing (Huang et al. 2024).

Shapes: ``logits`` / ``probs`` are ``[tokens, experts]``; every loss is a scalar.
Like V-MoE, the balance losses are computed per routing group (an image, in the
MoE layer: ``group_tokens`` tokens) and averaged over groups, so every image is
asked to spread its own tokens rather than the batch as a whole; the importance
loss sees the clean router distribution and only the load loss sees the noise.

>>> import torch
>>> float(importance_loss(torch.full((4, 2), 0.5)))
0.0
"""

from __future__ import annotations

import torch
from torch import Tensor

from ssroute.routing.ops import top_experts


def cv_squared(values: Tensor, eps: float = 1e-10) -> Tensor:
    """Squared coefficient of variation ``(std / mean)^2`` over the last axis: ``[..., experts] -> [...]``."""
    values = values.float()
    return values.var(dim=-1, unbiased=False) / (values.mean(dim=-1) ** 2 + eps)


def _groups(x: Tensor, group_tokens: int | None) -> Tensor:
    """``[tokens, ...] -> [groups, group_tokens, ...]`` (one group of all tokens when None)."""
    n = x.shape[0] if group_tokens is None else group_tokens
    return x.reshape(-1, n, *x.shape[1:])


def importance_loss(probs: Tensor, group_tokens: int | None = None) -> Tensor:
    """V-MoE importance loss: balance of the summed routing probabilities, per group, averaged."""
    return cv_squared(_groups(probs, group_tokens).sum(dim=1)).mean()


def noisy_load_loss(logits: Tensor, noisy_logits: Tensor, noise_std: float, k: int, group_tokens: int | None = None) -> Tensor:
    """V-MoE load loss: balance of P(expert in the noisy top-k) per expert, per group, averaged.

    An expert wins a token when its clean logit plus Gaussian noise exceeds the
    token's k-th largest noisy logit.
    """
    threshold = noisy_logits.gather(1, top_experts(noisy_logits, k)[:, -1:])
    noise_needed = (threshold - logits) / noise_std
    p_selected = 1.0 - torch.special.ndtr(noise_needed)
    return cv_squared(_groups(p_selected, group_tokens).mean(dim=1)).mean()


def switch_load_loss(probs: Tensor, top1: Tensor, group_tokens: int | None = None) -> Tensor:
    """Switch balance loss ``E * sum_e f_e P_e`` per group, averaged (1 when perfectly balanced)."""
    num_experts = probs.shape[1]
    fraction = torch.nn.functional.one_hot(top1, num_experts).to(probs.dtype)
    per_group = _groups(fraction, group_tokens).mean(dim=1) * _groups(probs, group_tokens).mean(dim=1)
    return num_experts * per_group.sum(dim=-1).mean()


def z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss: keeps logits small, ``mean(logsumexp(logits)^2)``."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


def entropy_loss(probs: Tensor, eps: float = 1e-9) -> Tensor:
    """Mean routing entropy; minimising it sharpens distributions so top-p picks fewer experts."""
    return -(probs * (probs + eps).log()).sum(dim=-1).mean()


def balance_losses(
    logits: Tensor,
    probs: Tensor,
    top_experts: Tensor,
    *,
    group_tokens: int | None = None,
    noisy_logits: Tensor | None = None,
    noise_std: float = 0.0,
    importance_weight: float = 0.0,
    load_weight: float = 0.0,
    z_loss_weight: float = 0.0,
) -> Tensor:
    """Weighted sum of the importance, load and z losses (zero weights cost nothing).

    ``probs`` is the clean router distribution, ``top_experts`` ``[tokens, k]``
    the executed choice; the load loss is V-MoE's noisy one when ``noise_std > 0``
    and the Switch one otherwise. Balance is asked per group of ``group_tokens``.
    """
    total = probs.new_zeros(())
    if importance_weight:
        total = total + importance_weight * importance_loss(probs, group_tokens)
    if load_weight:
        if noise_std > 0 and noisy_logits is not None:
            total = total + load_weight * noisy_load_loss(logits, noisy_logits, noise_std, top_experts.shape[1], group_tokens)
        else:
            total = total + load_weight * switch_load_loss(probs, top_experts[:, 0], group_tokens)
    if z_loss_weight:
        total = total + z_loss_weight * z_loss(logits)
    return total
