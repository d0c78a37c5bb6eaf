"""Per-block probes: kNN and linear probe on the output of every block of the stack.

As VISSL's per-layer linear evaluation (Goyal et al. 2021), to see where the
representation becomes useful: each block's tokens ``[batch, tokens, dim]`` go
through a LayerNorm without learned scale (blocks other than the last never
trained the backbone's final norm) and a mean pool — weighted by the patch
selector's pooling weights when it has any — giving ``[batch, dim]`` per block.
One forward pass (``backbone(images, keep_blocks=True)``) yields every block and
the backbone's own features, stacked as ``[batch, 1 + depth, dim]``.

>>> import torch
>>> from ssroute.models.vit import ViT
>>> vit = ViT(image_size=8, channels=1, dim=16, depth=3, heads=2, patch_size=2).eval()
>>> stacked_features(vit, torch.randn(4, 1, 8, 8)).shape
torch.Size([4, 4, 16])
"""

from __future__ import annotations

import torch
from torch import nn

from ssroute.eval.knn import knn_accuracy
from ssroute.eval.linear import linear_probe_accuracy
from ssroute.models.vit import ViT


@torch.no_grad()
def stacked_features(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``[batch, 1 + depth, dim]``: the backbone's features, then the pooled output of each block."""
    final, aux = backbone(images, keep_blocks=True)
    weights = aux.patches.pool_weights
    blocks = [ViT.pool(out, weights) for out in aux.block_tokens]  # pool() without a norm: LayerNorm without learned scale
    return torch.stack([final, *blocks], dim=1)


def block_probes(
    train_blocks: torch.Tensor,
    train_labels: torch.Tensor,
    test_blocks: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
    linear: bool = True,
    seed: int = 0,
) -> dict[str, float]:
    """``block{i}/knn_top1`` (and ``block{i}/linear_top1``) for each block of ``[images, depth, dim]`` features."""
    metrics: dict[str, float] = {}
    for i in range(train_blocks.shape[1]):
        metrics[f"block{i}/knn_top1"] = knn_accuracy(train_blocks[:, i], train_labels, test_blocks[:, i], test_labels, k, temperature)
        if linear:
            metrics[f"block{i}/linear_top1"] = linear_probe_accuracy(
                train_blocks[:, i], train_labels, test_blocks[:, i], test_labels, seed=seed
            )
    return metrics
