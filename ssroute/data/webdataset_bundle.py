"""``data=webdataset``: pretrain on WebDataset tar shards too big for one disk or read by many nodes.

``data.urls`` lists the training shards (brace-expanded, local paths or URLs; see
:mod:`ssroute.data.shards`). Pretraining streams them (:mod:`ssroute.data.shard_stream`:
per-rank and per-worker shards, shuffling seeded by ``(seed, epoch)``, exact resume by
sample count). What needs random access stays in memory and small:

- ``train``: the first ``data.probe_images`` samples of ``data.urls`` (in listing order),
  decoded at start-up — the probes' and fine-tuning's labelled images, the channel
  statistics and the routing-stability images;
- ``test``: the first ``data.probe_images`` samples of ``data.test_urls`` (labelled held-out
  shards), or, without them, a stratified ``data.test_fraction`` of that sample;
- ``stream``: every training sample, for the training loader.

Samples are labelled by an integer ``.cls`` member when every sample of the sample has one,
and unlabelled (pretraining only) otherwise. Images are converted to grey or RGB (from the
first image), resized on the shorter side and centre-cropped to ``data.image_size``
(default: the first image's shorter side).
"""

from __future__ import annotations

import io

import torch

from ssroute.data.base import DataBundle, ImageSet, channel_stats, stratified_split
from ssroute.data.folder_reader import decode_image, image_header
from ssroute.data.shard_stream import ShardStream
from ssroute.data.shards import IMAGE_KEYS, LABEL_KEY, ShardIndex, read_samples, scan_shards
from ssroute.errors import ConfigError


def _decode_sample(index: ShardIndex, limit: int, mode: str | None, size: int | None) -> tuple[ImageSet, str, int]:
    """The first ``limit`` samples of ``index`` decoded into memory, and the (mode, size) used."""
    raw = read_samples(index, limit)
    images, labels = [], []
    with_label = sum(LABEL_KEY in sample for sample in raw)
    if 0 < with_label < len(raw):
        raise ConfigError(
            f"{with_label} of the first {len(raw)} samples in {index.option} have a .{LABEL_KEY} label and the rest none; "
            "label every sample or none (unlabelled pretraining)."
        )
    labeled = with_label == len(raw)
    for sample in raw:
        data = next((value for key, value in sample.items() if key.rsplit(".", 1)[-1] in IMAGE_KEYS), None)
        where = f"sample {sample['__key__']!r} of shard {sample['__url__']}"
        if data is None:
            raise ConfigError(
                f"{where} has no image file ({', '.join(IMAGE_KEYS)}); every sample needs one, e.g. {sample['__key__']}.png — rewrite the shard."
            )
        if mode is None:
            header = image_header(io.BytesIO(data))
            if header is None:
                raise ConfigError(f"the image of {where} cannot be read; repair or drop the shard.")
            mode, side = header
            size = int(size or side)
        image = decode_image(io.BytesIO(data), mode, size)
        if image is not None:  # an undecodable image is counted by the stream when it trains on it
            images.append(image)
            labels.append(int(sample[LABEL_KEY].decode().strip()) if labeled else -1)
    if not images:
        raise ConfigError(f"none of the first {len(raw)} images in {index.option} decodes; repair the shards or fix the path.")
    return ImageSet(torch.stack(images), torch.tensor(labels)), mode, size


def load_webdataset_bundle(cfg, seed: int) -> DataBundle:
    if cfg.train_subset:
        raise ConfigError("data.train_subset does not apply to data=webdataset; list fewer shards in data.urls instead.")
    index = scan_shards(cfg.urls, "data.urls")
    sample, mode, size = _decode_sample(index, cfg.probe_images, None, cfg.image_size)
    mean, std = channel_stats(sample.images)
    stream = ShardStream(index, mode, size, cfg.batch_size, seed, cfg.shuffle_buffer, max_bad=int(cfg.max_bad_fraction * len(index)))
    channels, labeled = sample.images.shape[1], bool((sample.labels >= 0).all())
    if cfg.test_urls:
        if not labeled:
            raise ConfigError(
                "data.test_urls is for the probes, which need labels; give every sample of data.urls a .cls label, or drop data.test_urls."
            )
        test, _, _ = _decode_sample(scan_shards(cfg.test_urls, "data.test_urls"), cfg.probe_images, mode, size)
        if (test.labels < 0).any():
            raise ConfigError("the samples of data.test_urls have no .cls label; label them, or drop data.test_urls.")
        train = sample
    elif labeled:
        train_idx, test_idx = stratified_split(sample.labels.numpy(), cfg.test_fraction, seed)
        train, test = sample.subset(train_idx), sample.subset(test_idx)
    else:
        train, test = sample, None
    num_classes = int(max(train.labels.max(), test.labels.max())) + 1 if labeled else None
    return DataBundle("webdataset", train, test, channels, size, num_classes, mean, std, stream=stream)
