"""Training batches streamed from WebDataset tar shards: per-rank and per-worker shards, exact resume.

The order of an epoch is a pure function of ``(seed, epoch)`` and the shard list, as
for images in memory (:mod:`ssroute.data.loader`):

- the shards are permuted by ``(seed, epoch)``; rank ``r`` of ``R`` reads shards
  ``r, r + R, ...`` of that order, and its loader worker ``w`` of ``W`` every ``W``-th of
  those — no two ranks or workers read the same shard in an epoch;
- each worker shuffles its samples in a buffer (``data.shuffle_buffer``) seeded by
  ``(seed, epoch, rank, worker)`` and yields whole batches; the DataLoader takes them
  round-robin over the workers, so batch ``b`` of the epoch is worker ``b mod W``'s;
- every rank yields exactly ``samples // R // batch_size`` batches per epoch, the length of
  an epoch over the same images in memory; a worker whose shards run out first reads them
  again in a new order (only when the shards do not split evenly), so ranks never wait on
  each other.

Exact resume by sample count: a checkpoint stores the epoch, the batches the model
consumed and the number of workers; a resumed rank skips, in each worker, that worker's
share of the consumed batches — skipped samples are read but never decoded — and takes
the workers in the rotated order, so it yields exactly the batches the uninterrupted run
would have. A resume uses the stored worker count (the order depends on it).

Images are decoded in the workers to uint8 ``[channels, size, size]``
(:func:`~ssroute.data.folder_reader.decode_image`); one that does not decode, or a sample
without an image, takes the place of the worker's previous good image and is counted;
:meth:`ShardLoader.check_data` stops training once more than ``data.max_bad_fraction``
of the samples failed. Items are ``(image, label, sample number)``, numbered in shard
listing order.
"""

from __future__ import annotations

import io
import itertools
import logging
import random
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler, get_worker_info

from ssroute.data.folder_reader import decode_image
from ssroute.data.shards import IMAGE_KEYS, LABEL_KEY, ShardIndex, _webdataset
from ssroute.errors import ConfigError

log = logging.getLogger(__name__)


def _share(total: int, part: int, parts: int) -> int:
    """How many of the first ``total`` round-robin turns over ``parts`` fall to ``part``."""
    return total // parts + (part < total % parts)


class ShardStream(IterableDataset):
    """One rank's batches of one epoch (see the module docstring); :class:`ShardLoader` sets what to yield.

    Args:
        index: the shards and their sample counts.
        mode: ``L`` or ``RGB``.
        size: square side of the decoded images.
        batch_size: images per batch.
        seed: the run's seed.
        shuffle_buffer: samples each worker shuffles among.
        max_bad: samples that may fail to decode before :meth:`check` raises.
    """

    def __init__(self, index: ShardIndex, mode: str, size: int, batch_size: int, seed: int, shuffle_buffer: int, max_bad: int) -> None:
        self.index, self.mode, self.size, self.batch_size, self.seed = index, mode, size, batch_size, seed
        self.shuffle_buffer, self.max_bad = shuffle_buffer, max_bad
        self.offsets = index.offsets
        self.rank, self.world_size, self.workers = 0, 1, 1
        self.epoch, self.skip = 0, 0  # the epoch to yield and the batches of it already consumed
        self.bad = torch.zeros(1, dtype=torch.long).share_memory_()  # samples that failed, all workers together

    def __len__(self) -> int:
        return len(self.index)

    def batches_per_epoch(self) -> int:
        return len(self.index) // self.world_size // self.batch_size

    def shards_of(self, epoch: int, rank: int, worker: int, workers: int) -> list[int]:
        """Shard numbers read by ``worker`` of ``rank`` in ``epoch``, in reading order."""
        order = torch.randperm(len(self.index.urls), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        return order[rank :: self.world_size][worker::workers].tolist()

    def _passes(self, shards: list[int], rng: random.Random) -> Iterator[tuple[int, dict]]:
        """(sample number, raw sample) of ``shards``, each pass shuffled in the buffer, then again in new orders, endlessly.

        Each pass is shuffled on its own, so a worker whose quota fits its shards sees every sample once."""
        wds = _webdataset(self.index.option)
        for repeat in itertools.count():
            order = shards if repeat == 0 else rng.sample(shards, len(shards))
            yield from wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(self._read(order))

    def _read(self, shards: list[int]) -> Iterator[tuple[int, dict]]:
        wds = _webdataset(self.index.option)
        for shard in shards:
            url = self.index.urls[shard]
            try:
                for position, sample in enumerate(wds.tarfile_samples([{"url": url}])):
                    yield self.offsets[shard] + position, sample
            except Exception as exc:  # a shard changed or vanished since the start: the same sentence as the scan's
                raise ConfigError(
                    f"shard {url} in {self.index.option} cannot be read ({exc}); rewrite it or drop it from {self.index.option}."
                ) from None

    def _decode(self, sample: dict) -> torch.Tensor | None:
        data = next((value for key, value in sample.items() if key.rsplit(".", 1)[-1] in IMAGE_KEYS), None)
        return None if data is None else decode_image(io.BytesIO(data), self.mode, self.size)

    def worker_batches(self, worker: int, workers: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The batches logical ``worker`` of ``workers`` yields in this epoch after the consumed ones."""
        total, done = _share(self.batches_per_epoch(), worker, workers), _share(self.skip, worker, workers)
        if done >= total:
            return
        rng = random.Random(((self.seed * 1_000_003 + self.epoch) * 1_009 + self.rank) * 1_013 + worker)
        samples = self._passes(self.shards_of(self.epoch, self.rank, worker, workers), rng)
        wanted = itertools.islice(samples, done * self.batch_size, total * self.batch_size)
        images, labels, numbers, pending = [], [], [], 0
        for number, sample in wanted:
            image = self._decode(sample)
            if image is None:  # stands in for the previous good image (or the next one, at the start)
                self.bad += 1
                if images:
                    image = images[-1]
                else:
                    pending += 1
                    continue
            label = int(sample[LABEL_KEY].decode().strip()) if LABEL_KEY in sample else -1
            for _ in range(pending + 1):
                images.append(image), labels.append(label), numbers.append(number)
            pending = 0
            while len(images) >= self.batch_size:
                yield (
                    torch.stack(images[: self.batch_size]),
                    torch.tensor(labels[: self.batch_size]),
                    torch.tensor(numbers[: self.batch_size]),
                )
                images, labels, numbers = images[self.batch_size :], labels[self.batch_size :], numbers[self.batch_size :]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        position, count = (info.id, info.num_workers) if info is not None else (0, 1)
        # the DataLoader starts its round robin at worker 0; the epoch's next batch is worker (skip mod W)'s
        return self.worker_batches((position + self.skip) % count, count)

    def check(self) -> None:
        """Raise once more than ``max_bad`` samples have failed to decode."""
        count = int(self.bad)
        if count > self.max_bad:
            raise ConfigError(
                f"{count} samples in {self.index.option} have no image that decodes (more than data.max_bad_fraction of "
                f"{len(self.index)}); repair or drop the shards, or raise data.max_bad_fraction."
            )


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
