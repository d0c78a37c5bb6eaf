"""Fashion-MNIST (Xiao et al. 2017): 70,000 grey 28x28 images of 10 clothing classes.

Read from the IDX files of Debian's ``dataset-fashion-mnist`` package
(``/usr/share/datasets/fashion-mnist``) or from ``data.root``; downloaded through
torchvision only when ``data.download=true``. Official 60k/10k train/test split.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from ssroute.data.base import DataBundle, ImageSet, channel_stats
from ssroute.errors import ConfigError

DEBIAN_ROOT = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): magic, dims, then big-endian data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ConfigError(f"{path} is not an unsigned-byte IDX file; re-download it or point data.root elsewhere.")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ConfigError(f"{path} is truncated ({data.size} of {int(np.prod(shape))} bytes); re-download it.")
    return data.reshape(shape)


def _find(root: Path, stem: str) -> Path | None:
    for candidate in (root / stem, root / f"{stem}.gz", root / "FashionMNIST" / "raw" / stem, root / "FashionMNIST" / "raw" / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    return None


def load_fashion_mnist_bundle(cfg, seed: int) -> DataBundle:
    root = Path(cfg.root or DEBIAN_ROOT)
    paths = {key: _find(root, stem) for key, stem in FILES.items()}
    if any(p is None for p in paths.values()) and cfg.download:
        from torchvision.datasets import FashionMNIST

        for train in (True, False):
            FashionMNIST(str(root), train=train, download=True)
        paths = {key: _find(root, stem) for key, stem in FILES.items()}
    missing = [FILES[k] for k, p in paths.items() if p is None]
    if missing:
        raise ConfigError(
            f"Fashion-MNIST files {', '.join(missing)} are not in {root}; install Debian's dataset-fashion-mnist "
            "package, set data.root to a folder with the IDX files, or add data.download=true."
        )
    arrays = {key: read_idx(path) for key, path in paths.items()}
    train = ImageSet(torch.from_numpy(arrays["train_images"].copy()).unsqueeze(1), torch.from_numpy(arrays["train_labels"].astype(np.int64)))
    test = ImageSet(torch.from_numpy(arrays["test_images"].copy()).unsqueeze(1), torch.from_numpy(arrays["test_labels"].astype(np.int64)))
    mean, std = channel_stats(train.images)
    return DataBundle("fashion_mnist", train, test, 1, 28, 10, mean, std)
