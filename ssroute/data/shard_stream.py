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
:meth:`~ssroute.data.shard_loader.ShardLoader.check_data` stops training once more than ``data.max_bad_fraction``
of the samples failed. Items are ``(image, label, sample number)``, numbered in shard
listing order.
"""

from __future__ import annotations

import io
import itertools
import logging
import random
from collections.abc import Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from ssroute.data.folder_reader import decode_image
from ssroute.data.shards import IMAGE_KEYS, LABEL_KEY, ShardIndex, _webdataset
from ssroute.errors import ConfigError

log = logging.getLogger(__name__)


def _share(total: int, part: int, parts: int) -> int:
    """How many of the first ``total`` round-robin turns over ``parts`` fall to ``part``."""
    return total // parts + (part < total % parts)


class ShardStream(IterableDataset):
    """One rank's batches of one epoch (see the module docstring); :class:`~ssroute.data.shard_loader.ShardLoader` sets what to yield.

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
