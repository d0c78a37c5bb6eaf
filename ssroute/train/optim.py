"""AdamW with weight decay only on weight matrices, and a per-step warmup + cosine schedule."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from lightly.utils.scheduler import CosineWarmupScheduler
from torch import nn


def param_groups(named: Iterable[tuple[str, nn.Parameter]], weight_decay: float, lr_scale: dict[str, float] | None = None) -> list[dict]:
    """Split trainable parameters into decayed (matrices) and undecayed (norms, biases, codes) groups.

    ``lr_scale`` maps a name prefix to a learning-rate multiplier (layer decay in fine-tuning).
    """
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, param in named:
        if not param.requires_grad:
            continue
        scale = 1.0
        for prefix, value in (lr_scale or {}).items():
            if name.startswith(prefix):
                scale = value
        groups.setdefault((param.ndim >= 2, scale), []).append(param)
    return [
        {"params": params, "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale}
        for (decay, scale), params in groups.items()
    ]


def phased_warmup_cosine(steps_per_epoch: int, warmup_epochs: float, phase_bounds: Callable[[int], tuple[int, int]]) -> Callable[[int], float]:
    """LR factor per step: warmup then cosine to 0 within each training phase (layerwise schedules)."""

    def factor(step: int) -> float:
        start, length = phase_bounds(step // max(1, steps_per_epoch))
        total = max(1, length * steps_per_epoch)
        local = step - start * steps_per_epoch
        warmup = min(int(warmup_epochs * steps_per_epoch), total - 1)
        if local < warmup:
            return (local + 1) / (warmup + 1)
        return 0.5 * (1.0 + math.cos(math.pi * (local - warmup) / max(1, total - warmup)))

    return factor


def build_optimizer(
    module: nn.Module,
    cfg,
    steps_per_epoch: int,
    max_epochs: int,
    lr_scale: dict[str, float] | None = None,
    phase_bounds: Callable[[int], tuple[int, int]] | None = None,
):
    """Lightning ``configure_optimizers`` dict: AdamW, linear warmup, cosine decay, stepped per batch.

    With ``phase_bounds`` (epoch -> first epoch and length of its phase) the
    warmup and decay restart in every phase of a layerwise schedule.
    """
    groups = param_groups(module.named_parameters(), cfg.weight_decay, lr_scale)
    for group in groups:
        group["lr"] = cfg.lr * group["lr_scale"]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    total = max(1, steps_per_epoch * max_epochs)
    warmup = min(int(cfg.warmup_epochs * steps_per_epoch), total - 1)
    if phase_bounds is not None:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, phased_warmup_cosine(steps_per_epoch, cfg.warmup_epochs, phase_bounds))
    else:
        scheduler = CosineWarmupScheduler(optimizer, warmup_epochs=warmup, max_epochs=total, end_value=0.0)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
