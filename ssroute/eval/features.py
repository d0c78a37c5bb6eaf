"""Feature extraction and cross-rank gathering for evaluation.

Every rank embeds its shard of a dataset (a padded, strided split so all ranks
see equally many items); the shards are gathered and the padding duplicates
removed by dataset index, so metrics are computed over each image exactly once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler


@contextmanager
def evaluating(module: nn.Module, seed: int | None = None) -> Iterator[nn.Module]:
    """``module`` in eval mode without autograd for the block, every submodule's own mode restored afterwards.

    With ``seed`` the block also runs on its own random stream (``torch.random.fork_rng``), so
    a measurement taken during training (random routers, augmentations) leaves the training's
    randomness exactly where it was — what exact resumes need.
    """
    modes = {m: m.training for m in module.modules()}
    param = next(module.parameters(), None)
    devices = [param.device] if param is not None and param.device.type == "cuda" else []
    module.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            yield module
    finally:
        for m, training in modes.items():
            m.training = training


class ShardSampler(Sampler[int]):
    """Rank ``rank`` of ``world_size`` takes every ``world_size``-th index, padded by wrapping."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1) -> None:
        self.length, self.rank, self.world_size = length, rank, world_size

    def __len__(self) -> int:
        return math.ceil(self.length / self.world_size)

    def __iter__(self) -> Iterator[int]:
        total = len(self) * self.world_size
        return iter([i % self.length for i in range(self.rank, total, self.world_size)])


def eval_loader(dataset: Dataset, batch_size: int, rank: int = 0, world_size: int = 1, num_workers: int = 0) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), rank, world_size), num_workers=num_workers)


@torch.no_grad()
def extract(
    embed: Callable[[torch.Tensor], torch.Tensor], loader: DataLoader, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(features, labels, dataset indices) of this rank's shard; ``embed`` takes uint8 images."""
    feats, labels, indices = [], [], []
    for images, y, idx in loader:
        feats.append(embed(images.to(device)).float())
        labels.append(y.to(device))
        indices.append(idx.to(device))
    return torch.cat(feats), torch.cat(labels), torch.cat(indices)


def gather_unique(
    all_gather: Callable[[torch.Tensor], torch.Tensor], *tensors: torch.Tensor, index: torch.Tensor, world_size: int
) -> list[torch.Tensor]:
    """All-gather ``tensors`` (and ``index``) from every rank, sort by index, drop duplicates."""
    if world_size > 1:
        tensors = tuple(all_gather(t).flatten(0, 1) for t in tensors)
        index = all_gather(index).flatten(0, 1)
    order = torch.argsort(index)
    index = index[order]
    keep = torch.ones_like(index, dtype=torch.bool)
    keep[1:] = index[1:] != index[:-1]
    return [t[order][keep].cpu() for t in tensors]
