"""The training loader over WebDataset shards: Lightning's epoch in, the consumed batches out to the checkpoint.

:class:`ShardLoader` has the interface of :class:`~ssroute.data.loader.ResumableLoader`
(``mark_consumed``, ``check_data``, ``state_dict`` / ``load_state_dict``) over a
:class:`~ssroute.data.shard_stream.ShardStream`, whose docstring says what an epoch
holds and how a resume finds its place. The stream yields whole batches, so the
DataLoader only starts the workers and takes their batches in turn.

>>> import tempfile
>>> from ssroute.data.shards import bytes_png, scan_shards, write_shards
>>> folder = tempfile.mkdtemp()
>>> _ = write_shards(folder, [(bytes_png(2, n), None) for n in range(12)], per_shard=4)
>>> stream = ShardStream(scan_shards(f"{folder}/shard-{{000000..000002}}.tar"), "L", 2, 4, 0, shuffle_buffer=4, max_bad=0)
>>> loader = ShardLoader(stream, batch_size=4, seed=0)
>>> [numbers.tolist() for _, _, numbers in loader] == [numbers.tolist() for _, _, numbers in loader], len(loader)
(True, 3)
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader, Sampler

from ssroute.data.shard_stream import ShardStream
from ssroute.errors import ConfigError

log = logging.getLogger(__name__)


class _EpochMarker(Sampler):
    """Stands in for the DataLoader's endless sampler of an iterable dataset, so that Lightning's
    ``set_epoch`` (as on a DistributedSampler) reaches the stream."""

    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[None]:
        return itertools.repeat(None)


class ShardLoader(DataLoader):
    """The training loader over a :class:`ShardStream`, with the interface of
    :class:`~ssroute.data.loader.ResumableLoader`: call :meth:`mark_consumed` as each step starts.

    Args:
        stream: the shards to read.
        batch_size: images per batch per rank.
        seed: the run's seed.
        rank: this process's rank.
        world_size: number of processes.
        num_workers: loader worker processes (at most the shards a rank gets in an epoch).
    """

    def __init__(self, stream: ShardStream, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, num_workers: int = 0) -> None:
        shards = len(stream.index.urls)
        if shards < world_size:
            raise ConfigError(
                f"{stream.index.option} has {shards} shard(s) for {world_size} processes; write at least one shard per process "
                "(several per loader worker is best)."
            )
        if len(stream) // world_size < batch_size:
            raise ConfigError(
                f"data.batch_size={batch_size} is larger than the {len(stream) // world_size} training images per device; lower data.batch_size."
            )
        stream.batch_size, stream.seed, stream.rank, stream.world_size = batch_size, seed, rank, world_size
        workers = min(num_workers, shards // world_size)
        if workers < num_workers:
            log.info(
                "reading %d shard(s) per process with %d loader worker(s) (one shard per worker at least)", shards // world_size, workers
            )
        super().__init__(stream, batch_size=None, num_workers=workers)
        self.epochs = _EpochMarker()
        object.__setattr__(self, "sampler", self.epochs)  # DataLoader forbids setting its sampler after __init__
        self.consumed = 0
        self._resume: tuple[int, int] | None = None

    def __iter__(self) -> Iterator:
        return self._batches()

    def _batches(self) -> Iterator:
        # Lazily, at the first batch: Lightning creates the iterator before it calls set_epoch (and on a resume
        # before the checkpoint's position is known); the workers start with the epoch and the position set.
        stream = self.dataset
        stream.epoch = self.epochs.epoch
        self.consumed = self._resume[1] if self._resume and self._resume[0] == stream.epoch else 0
        self._resume = None
        stream.skip = self.consumed
        yield from super().__iter__()

    def __len__(self) -> int:
        return self.dataset.batches_per_epoch()

    def mark_consumed(self) -> None:
        self.consumed += 1

    def check_data(self) -> None:
        self.dataset.check()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epochs.epoch, "consumed": self.consumed, "workers": max(1, self.num_workers)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = (state["epoch"], state["consumed"])
        workers = int(state.get("workers", 1))
        if workers != max(1, self.num_workers):  # the order of an epoch depends on the worker count: keep the checkpoint's
            log.info("resuming with the checkpoint's %d loader worker(s)", workers)
            self.num_workers = workers if workers > 1 else 0
            self.prefetch_factor = 2 if workers > 1 else None
