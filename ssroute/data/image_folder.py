"""Any folder of images: class subfolders give labels, a flat folder is unlabelled.

``root/cat/1.png, root/dog/2.jpg`` -> labelled (classes sorted by name);
``root/1.png, root/2.jpg`` -> unlabelled (pretraining only). Images are converted
to grey or RGB (from the first readable image), resized on the shorter side and
centre-cropped to ``data.image_size`` (default: the first image's shorter side).
Unreadable files are skipped and counted; more than ``data.max_bad_fraction`` of
them is an error that names the files. Small folders are decoded once into
memory; large ones are decoded per item.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ssroute.data.base import UNLABELED, DataBundle, ImageSet, channel_stats, stratified_split
from ssroute.errors import ConfigError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
IN_MEMORY_BYTES = 2 * 1024**3  # decode everything up front below this size


def _scan(root: Path) -> tuple[list[Path], list[int], list[str], int]:
    """Image paths, their labels, class names and the number of non-image files skipped."""
    if not root.is_dir():
        raise ConfigError(f"data.root={str(root)!r} is not a folder; point it at a folder of images or of class subfolders.")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files, labels, skipped = [], [], 0
    if subdirs:
        classes = [d.name for d in subdirs]
        for label, folder in enumerate(subdirs):
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    if path.suffix.lower() in IMAGE_SUFFIXES:
                        files.append(path)
                        labels.append(label)
                    else:
                        skipped += 1
    else:
        classes = []
        for path in sorted(root.iterdir()):
            if path.is_file():
                if path.suffix.lower() in IMAGE_SUFFIXES:
                    files.append(path)
                    labels.append(UNLABELED)
                else:
                    skipped += 1
    if not files:
        raise ConfigError(f"data.root={str(root)!r} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))}); add images or fix the path.")
    return files, labels, classes, skipped


def _decode(path: Path, mode: str, size: int) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert(mode)
        w, h = img.size
        scale = size / min(w, h)
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
        array = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(array.copy()).reshape(size, size, -1).permute(2, 0, 1).contiguous()


def _readable(path: Path) -> tuple[str, int] | None:
    """(mode, shorter side) of a readable image, or None when the file is corrupt."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()  # verify() misses truncated pixel data; a full load does not
            mode = "L" if img.mode in ("1", "L", "I;16", "I", "F") else "RGB"
            return mode, min(img.size)
    except Exception:  # PIL raises many types for broken files
        return None


def load_image_folder_bundle(cfg, seed: int) -> DataBundle:
    root = Path(cfg.root) if cfg.root else None
    if root is None:
        raise ConfigError("data=image_folder needs data.root=PATH, a folder of images or of class subfolders.")
    files, labels, classes, non_images = _scan(root)
    info = [_readable(p) for p in files]
    bad = [p for p, i in zip(files, info, strict=True) if i is None]
    if len(bad) > cfg.max_bad_fraction * len(files):
        names = ", ".join(str(p) for p in bad[:5]) + (" ..." if len(bad) > 5 else "")
        raise ConfigError(
            f"{len(bad)} of {len(files)} image files in {root} cannot be read ({names}); remove or repair them, or raise data.max_bad_fraction."
        )
    keep = [i for i, x in enumerate(info) if x is not None]
    if bad or non_images:
        log.warning("image folder %s: skipped %d unreadable image(s) and %d non-image file(s)", root, len(bad), non_images)
    files = [files[i] for i in keep]
    label_tensor = torch.tensor([labels[i] for i in keep], dtype=torch.long)
    mode, first_side = info[keep[0]]
    size = int(cfg.image_size or first_side)
    channels = 1 if mode == "L" else 3
    if len(files) * channels * size * size <= IN_MEMORY_BYTES:
        images = torch.stack([_decode(p, mode, size) for p in files])
        everything = ImageSet(images, label_tensor)
        mean, std = channel_stats(images)
    else:
        everything = ImageSet(None, label_tensor, loader=lambda i: _decode(files[i], mode, size))
        sample = torch.stack([_decode(files[i], mode, size) for i in range(0, len(files), max(1, len(files) // 500))])
        mean, std = channel_stats(sample)
    if not classes:
        return DataBundle(root.name, everything, None, channels, size, None, mean, std)
    if len(classes) < 2:
        raise ConfigError(f"data.root={str(root)!r} has a single class folder; add a folder per class, or put the images directly in the root to use them unlabelled.")
    train_idx, test_idx = stratified_split(label_tensor.numpy(), cfg.test_fraction, seed)
    return DataBundle(root.name, everything.subset(train_idx), everything.subset(test_idx), channels, size, len(classes), mean, std)
