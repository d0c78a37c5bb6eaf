"""What a pruning run measures before and after: test accuracy of a classifier and inference throughput.

Throughput is images per second of ``head(backbone(images))`` in eval mode
without autograd, best of ``repeats`` timed passes over the same batches after
one warm-up pass — on whatever threads the process has (the commands in
docs/compression.md pin one thread), so the number is the model's, not the
machine's load.

>>> import torch
>>> from ssroute.models.vit import ViT
>>> vit = ViT(image_size=8, channels=1, dim=16, depth=1, heads=2, patch_size=2)
>>> images_per_second(vit, None, torch.randn(20, 1, 8, 8), batch_size=10) > 0
True
"""

from __future__ import annotations

import time

import torch
from torch import nn


@torch.no_grad()
def images_per_second(backbone: nn.Module, head: nn.Module | None, images: torch.Tensor, batch_size: int = 256, repeats: int = 3) -> float:
    """Best-of-``repeats`` inference throughput over ``images`` (normalised, on the model's device)."""
    modes = (backbone.training, head.training if head is not None else False)
    backbone.eval()
    if head is not None:
        head.eval()
    batches = list(images.split(batch_size))

    def one_pass() -> None:
        for batch in batches:
            features = backbone(batch)[0]
            if head is not None:
                head(features)

    try:
        one_pass()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            one_pass()
            best = min(best, time.perf_counter() - start)
    finally:
        backbone.train(modes[0])
        if head is not None:
            head.train(modes[1])
    return images.shape[0] / best


def paired_images_per_second(
    models: dict[str, tuple[nn.Module, nn.Module | None]], images: torch.Tensor, batch_size: int = 256, rounds: int = 3
) -> dict[str, float]:
    """Throughput of several ``(backbone, head)`` models timed in alternation (best of ``rounds`` each), so a
    change of the machine's load between them biases no one model."""
    best = {name: 0.0 for name in models}
    for _ in range(rounds):
        for name, (backbone, head) in models.items():
            best[name] = max(best[name], images_per_second(backbone, head, images, batch_size, repeats=1))
    return best


@torch.no_grad()
def top1(backbone: nn.Module, head: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    """Test accuracy of ``head(backbone(images))`` in eval mode (mode restored)."""
    modes = (backbone.training, head.training)
    backbone.eval(), head.eval()
    try:
        predicted = torch.cat([head(backbone(batch)[0]).argmax(-1) for batch in images.split(batch_size)])
    finally:
        backbone.train(modes[0]), head.train(modes[1])
    return float((predicted.cpu() == labels.cpu()).float().mean())
