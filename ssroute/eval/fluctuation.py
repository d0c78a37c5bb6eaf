"""Routing fluctuation over training (StableMoE, Dai et al. 2022, arXiv 2204.08396).

StableMoE observes that a token's target expert keeps changing while a router
learns, so the expert that was trained on a token is often not the one that
serves it at inference. It measures this on a fixed probe set: take a routing
*snapshot* (each token's top-1 expert) every few steps and count

- the **fluctuation** of an interval: the share of tokens whose expert changed
  between two consecutive snapshots;
- each token's **last fluctuation step**: the step of the last snapshot at which
  its expert differed from the snapshot before. A token that never changed gets
  the first snapshot's step (it has been stable since the start of the record).

Snapshots of one routing block are ``[snapshots, tokens]`` integer tensors, the
steps ``[snapshots]``; the functions are pure and vectorised over tokens.

>>> import torch
>>> experts = torch.tensor([[0, 1, 2, 3], [0, 1, 3, 3], [1, 1, 3, 2]])  # 3 snapshots x 4 tokens
>>> fluctuation(experts).tolist()
[0.25, 0.5]
>>> last_change_steps(experts, torch.tensor([0, 10, 20])).tolist()
[20, 0, 10, 20]
"""

from __future__ import annotations

import torch
from torch import Tensor

from ssroute.routing import Routing


@torch.no_grad()
def top1_experts(routing: Routing) -> Tensor:
    """``[tokens]`` each token's top-1 expert: the kept assignment with the largest combine weight.

    Tokens without a kept assignment (dropped by capacity) fall back to the
    argmax of ``probs``, the router's preference, so a token is not counted as
    fluctuating merely because a full expert dropped it. Using the kept
    assignments rather than ``probs`` alone keeps random routing (uniform
    ``probs``) honest.
    """
    top1 = routing.executed_top1()
    return torch.where(top1 >= 0, top1, routing.probs.detach().argmax(dim=1))


def changed(snapshots: Tensor) -> Tensor:
    """``[snapshots - 1, tokens]`` bool: did the token's expert change since the previous snapshot?"""
    if snapshots.dim() != 2:
        raise ValueError(f"snapshots must be [snapshots, tokens], got shape {tuple(snapshots.shape)}")
    return snapshots[1:] != snapshots[:-1]


def fluctuation(snapshots: Tensor) -> Tensor:
    """``[snapshots - 1]`` share of tokens whose expert changed in each interval."""
    return changed(snapshots).double().mean(dim=1)


def last_change_steps(snapshots: Tensor, steps: Tensor) -> Tensor:
    """``[tokens]`` step of the last snapshot at which each token's expert changed (``steps[0]`` if never)."""
    moved = changed(snapshots)
    if steps.shape != (snapshots.shape[0],):
        raise ValueError(f"steps must be [{snapshots.shape[0]}] (one per snapshot), got shape {tuple(steps.shape)}")
    # snapshot index at which each change shows (1..S-1); 0 where nothing changed, so the max is the last change or 0
    index = torch.arange(1, snapshots.shape[0], device=snapshots.device).unsqueeze(1)
    last = (moved.long() * index).amax(dim=0) if len(moved) else torch.zeros(snapshots.shape[1], dtype=torch.long, device=snapshots.device)
    return steps.to(snapshots.device)[last]


def fluctuation_metrics(history: dict[str, Tensor], steps: Tensor) -> dict[str, float]:
    """Flat metrics of per-block snapshot histories ``{block name: [snapshots, tokens]}``.

    ``block{i}/routing_fluctuation`` (the last interval), ``routing_fluctuation``
    (its mean over blocks) and ``block{i}/routing_last_change_step_mean``. Empty
    when fewer than two snapshots exist.
    """
    out: dict[str, float] = {}
    if steps.numel() < 2:
        return out
    last_interval = []
    for name, snapshots in history.items():
        block = name.split(".")[1] if name.startswith("blocks.") else name
        rate = float(fluctuation(snapshots[-2:])[0])
        last_interval.append(rate)
        out[f"block{block}/routing_fluctuation"] = rate
        out[f"block{block}/routing_last_change_step_mean"] = float(last_change_steps(snapshots, steps).double().mean())
    if last_interval:
        out["routing_fluctuation"] = sum(last_interval) / len(last_interval)
    return out


__all__ = ["changed", "fluctuation", "fluctuation_metrics", "last_change_steps", "top1_experts"]
