"""Any folder of images: class subfolders give labels, a flat folder is unlabelled.

``root/cat/1.png, root/dog/2.jpg`` -> labelled (classes sorted by name);
``root/1.png, root/2.jpg`` -> unlabelled (pretraining only). Images are converted
to grey or RGB (from the first readable image), resized on the shorter side and
centre-cropped to ``data.image_size`` (default: the first image's shorter side).
The folder is listed in parallel, one thread per class folder.

- Folders of up to ``EAGER_FILES`` images are decoded once, in parallel, into
  memory; unreadable files are skipped and counted, and more than
  ``data.max_bad_fraction`` of them is an error that names the files, before
  anything trains.
- Larger folders are read lazily (:class:`~ssroute.data.folder_reader.FolderReader`):
  only the first image's header and a sample for the channel statistics are
  read before training starts, and images are decoded in the DataLoader's
  worker processes as batches need them (``data.num_workers``, by default
  several for file-backed data), small ones into a shared cache so that each
  file is decoded once. A file that fails to decode at load time is skipped —
  its place in the batch goes to the next readable image of its class — counted
  and reported (``unreadable_images`` in ``metrics.json``); once more than
  ``data.max_bad_fraction`` of the files have failed, training stops with an
  error that names them.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ssroute.data.base import UNLABELED, DataBundle, ImageSet, channel_stats, stratified_split
from ssroute.data.folder_reader import FolderReader, decode_image, image_header
from ssroute.errors import ConfigError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
EAGER_FILES = 10_000  # folders up to this many images are decoded up front; larger ones lazily, in the loader's workers
STATS_SAMPLE = 512  # images decoded for the channel statistics of a lazily read folder


def _list_files(folder: str) -> tuple[list[str], int]:
    """Image files under ``folder`` (recursively, sorted) and the number of other files.

    Strings and ``os.scandir`` throughout: a ``Path`` and a ``stat`` per file cost more than the listing
    itself for a folder of 100,000 files.
    """
    images, others, stack = [], 0, [folder]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.name.startswith("."):  # hidden files and folders (.DS_Store, .git) are no data
                    continue
                if entry.is_dir(follow_symlinks=True):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=True):
                    if os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES:
                        images.append(entry.path)
                    else:
                        others += 1
    return sorted(images), others


def _scan(root: Path) -> tuple[list[str], list[int], list[str], int]:
    """Image paths, their labels, class names and the number of non-image files skipped."""
    if not root.is_dir():
        raise ConfigError(f"data.root={str(root)!r} is not a folder; point it at a folder of images or of class subfolders.")
    with os.scandir(root) as entries:
        subdirs = sorted(e.path for e in entries if not e.name.startswith(".") and e.is_dir(follow_symlinks=True))
    files, labels = [], []
    if subdirs:
        classes = [os.path.basename(d) for d in subdirs]
        with ThreadPoolExecutor(max_workers=min(16, len(subdirs))) as pool:
            listed = list(pool.map(_list_files, subdirs))
        for label, (paths, _) in enumerate(listed):
            files += paths
            labels += [label] * len(paths)
        skipped = sum(others for _, others in listed)
    else:
        classes = []
        files, skipped = _list_files(str(root))
        labels = [UNLABELED] * len(files)
    if not files:
        raise ConfigError(
            f"data.root={str(root)!r} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))}); add images or fix the path."
        )
    return files, labels, classes, skipped


def _too_many_bad(bad: list[str], total: int, root: Path) -> ConfigError:
    names = ", ".join(str(p) for p in bad[:5]) + (" ..." if len(bad) > 5 else "")
    return ConfigError(
        f"{len(bad)} of {total} image files in {root} cannot be read ({names}); remove or repair them, or raise data.max_bad_fraction."
    )


def _first_header(files: list[str]) -> tuple[str, int, list[str]]:
    """(mode, shorter side) of the first file whose header reads, and the files before it that did not."""
    bad = []
    for path in files:
        header = image_header(path)
        if header is not None:
            return *header, bad
        bad.append(path)
    return "L", 0, bad


def _decode_all(files: list[str], mode: str, size: int) -> list[torch.Tensor | None]:
    """Decode every file in parallel threads (PIL releases the GIL while decoding); None for unreadable files."""
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2))) as pool:
        return list(pool.map(lambda p: decode_image(p, mode, size), files, chunksize=64))


def load_image_folder_bundle(cfg, seed: int) -> DataBundle:
    root = Path(cfg.root) if cfg.root else None
    if root is None:
        raise ConfigError("data=image_folder needs data.root=PATH, a folder of images or of class subfolders.")
    files, labels, classes, non_images = _scan(root)
    if len(classes) == 1:
        raise ConfigError(
            f"data.root={str(root)!r} has a single class folder; add a folder per class, or put the images directly in the root to use them unlabelled."
        )
    allowed = cfg.max_bad_fraction * len(files)
    mode, first_side, bad = _first_header(files[: max(1, int(allowed) + 1)])
    if len(bad) > allowed or not first_side:
        raise _too_many_bad(bad, len(files), root)
    size = int(cfg.image_size or first_side)
    channels = 1 if mode == "L" else 3
    label_tensor = torch.tensor(labels, dtype=torch.long)
    reader = None
    if len(files) <= EAGER_FILES:
        decoded = _decode_all(files, mode, size)
        bad = [p for p, image in zip(files, decoded, strict=True) if image is None]
        if len(bad) > allowed:
            raise _too_many_bad(bad, len(files), root)
        keep = [i for i, image in enumerate(decoded) if image is not None]
        images = torch.stack([decoded[i] for i in keep])
        everything = ImageSet(images, label_tensor[keep])
        mean, std = channel_stats(images)
        unreadable = len(bad)
    else:
        reader = FolderReader(files, labels, mode, size, max_bad=int(allowed), root=root)
        sample = [reader.decode_or_mark(i) for i in np.linspace(0, len(files) - 1, min(STATS_SAMPLE, len(files))).astype(int)]
        mean, std = channel_stats(torch.stack([image for image in sample if image is not None]))
        everything = ImageSet(None, label_tensor, loader=reader, source=reader)
        unreadable = reader.bad_count()
    if unreadable or non_images:
        log.warning("image folder %s: skipped %d unreadable image(s) and %d non-image file(s)", root, unreadable, non_images)
    if not classes:
        return DataBundle(root.name, everything, None, channels, size, None, mean, std, reader=reader)
    train_idx, test_idx = stratified_split(everything.labels.numpy(), cfg.test_fraction, seed)
    return DataBundle(
        root.name, everything.subset(train_idx), everything.subset(test_idx), channels, size, len(classes), mean, std, reader=reader
    )
