"""A training loader whose position survives a kill: exact mid-epoch resume.

The sampler draws a fresh permutation per epoch from ``(seed, epoch)`` alone and
shards it across DDP ranks, so data order never depends on process history.
The loader is *stateful* in Lightning's sense (``state_dict`` /
``load_state_dict``): a checkpoint records the epoch and how many batches the
model has consumed, and a resumed run skips exactly those batches. Together with
per-step seeding of the augmentations (see ``ssroute.train.base``) a resumed run
repeats an uninterrupted one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ssroute.errors import ConfigError


class EpochSampler(Sampler[int]):
    """Seeded per-epoch shuffling, sharded over ``world_size`` ranks, dropping the ragged tail.

    Args:
        length: dataset size.
        seed: base seed; epoch ``e`` uses permutation ``seed * 1_000_003 + e``.
        rank: this process's rank.
        world_size: number of processes.
        batch_size: batch size, to turn consumed batches into skipped samples on resume.
    """

    def __init__(self, length: int, seed: int = 0, rank: int = 0, world_size: int = 1, batch_size: int = 1) -> None:
        self.length, self.seed, self.rank, self.world_size, self.batch_size = length, seed, rank, world_size, batch_size
        self.epoch = 0
        self.consumed = 0  # batches of the current epoch handed to the model
        self._resume: tuple[int, int] | None = None  # (epoch, consumed batches) from a checkpoint

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, consumed: int) -> None:
        self._resume = (epoch, consumed)

    def __len__(self) -> int:
        return self.length // self.world_size

    def __iter__(self) -> Iterator[int]:
        # Called lazily at the first batch, i.e. after Lightning's set_epoch for this epoch.
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.length, generator=generator)
        mine = order[self.rank : len(self) * self.world_size : self.world_size]
        self.consumed = self._resume[1] if self._resume and self._resume[0] == self.epoch else 0
        self._resume = None
        return iter(mine[self.consumed * self.batch_size :].tolist())


def loader_workers(requested: int | None, dataset: Dataset) -> int:
    """DataLoader worker processes: ``data.num_workers``, or for None 0 for images held in memory and
    up to 4 (the cores this process may use) for file-backed data, which is decoded in the workers.

    >>> import torch
    >>> from ssroute.data.base import ImageSet
    >>> loader_workers(None, ImageSet(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(2))), loader_workers(3, None)
    (0, 3)
    """
    if requested is not None:
        return int(requested)
    if getattr(dataset, "images", None) is not None:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cores))


class ResumableLoader(DataLoader):
    """DataLoader that checkpoints its epoch position; call :meth:`mark_consumed` as each step starts."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, **kwargs: Any) -> None:
        if len(dataset) // world_size < batch_size:
            raise ConfigError(
                f"data.batch_size={batch_size} is larger than the {len(dataset) // world_size} training images per device; lower data.batch_size."
            )
        self.epoch_sampler = EpochSampler(len(dataset), seed, rank, world_size, batch_size)
        if kwargs.get("num_workers"):
            kwargs.setdefault("persistent_workers", True)  # no re-forking each epoch; decoded images stay cached
        super().__init__(dataset, batch_size=batch_size, sampler=self.epoch_sampler, drop_last=True, **kwargs)

    def mark_consumed(self) -> None:
        self.epoch_sampler.consumed += 1

    def check_data(self) -> None:
        """Let the dataset's reader object to what the workers found (too many unreadable files)."""
        source = getattr(self.dataset, "source", None)
        if source is not None:
            source.check()

    def __len__(self) -> int:
        return len(self.epoch_sampler) // self.batch_size

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch_sampler.epoch, "consumed": self.epoch_sampler.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch_sampler.resume(state["epoch"], state["consumed"])
