"""What every dataset returns: images as uint8 ``[channels, height, width]``.

Datasets hand out raw uint8 images and integer labels (``-1`` when unlabelled);
conversion to float, normalisation and augmentation happen later on whole
batches on the training device (see :mod:`ssroute.data.views`). Items are
``(image, label, index)`` so distributed evaluation can drop the duplicates a
padded sampler adds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

UNLABELED = -1


class ImageSet(Dataset):
    """Images held in memory as one uint8 tensor, or loaded one by one (file-backed).

    Args:
        images: ``[n, channels, height, width]`` uint8 tensor, or ``None`` with ``loader``.
        labels: ``[n]`` int64 labels, ``-1`` for unlabelled images.
        loader: ``index -> uint8 [channels, height, width]`` for data too big for memory.
        source: the reader behind ``loader`` when it has a ``check()`` to run as batches arrive
            (:class:`~ssroute.data.folder_reader.FolderReader`: too many unreadable files); kept by :meth:`subset`.
    """

    def __init__(
        self,
        images: torch.Tensor | None,
        labels: torch.Tensor,
        loader: Callable[[int], torch.Tensor] | None = None,
        source: object | None = None,
    ) -> None:
        if images is None and loader is None:
            raise ValueError("ImageSet needs images or a loader")
        if images is not None and images.dtype != torch.uint8:
            raise ValueError(f"ImageSet images must be uint8, got {images.dtype}")
        self.images = images
        self.labels = labels.long()
        self.loader = loader
        self.source = source

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        image = self.images[index] if self.images is not None else self.loader(index)
        return image, int(self.labels[index]), index

    def subset(self, indices: np.ndarray | torch.Tensor) -> ImageSet:
        indices = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        if self.images is not None:
            return ImageSet(self.images[indices], self.labels[indices])
        base = self.loader
        return ImageSet(None, self.labels[indices], loader=lambda i: base(int(indices[i])), source=self.source)


@dataclass
class DataBundle:
    """A dataset ready for training: splits plus what the model needs to know about it."""

    name: str
    train: ImageSet  # pretraining / fine-tuning images
    test: ImageSet | None  # held-out images (None for unlabelled folders)
    channels: int  # image channels, read from the data
    image_size: int  # square image side in pixels, read from the data
    num_classes: int | None  # None when unlabelled
    mean: tuple[float, ...]  # per-channel mean of train images in [0, 1]
    std: tuple[float, ...]  # per-channel std of train images in [0, 1]
    labeled_train: ImageSet | None = None  # labelled train images when `train` is unlabelled (STL-10)
    held_out: str = "test"  # what `test` holds: the test split, or "val" (data.val_fraction of the training images)
    reader: object | None = None  # the lazy file reader of a large image folder (unreadable-file count), else None
    stream: object | None = None  # data=webdataset: the training shards the loader streams (`train` holds a sample of them)

    @property
    def train_count(self) -> int:
        """Training images per epoch: the stream's samples, or the train split's."""
        return len(self.stream) if self.stream is not None else len(self.train)

    @property
    def labeled(self) -> bool:
        return self.num_classes is not None

    @property
    def probe_train(self) -> ImageSet:
        """The labelled images that probes and fine-tuning train on."""
        return self.labeled_train if self.labeled_train is not None else self.train


def channel_stats(images: torch.Tensor, max_images: int = 10000) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units of a uint8 ``[n, c, h, w]`` tensor."""
    sample = images[:max_images].float() / 255.0
    mean = sample.mean(dim=(0, 2, 3))
    std = sample.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(mean.tolist()), tuple(std.tolist())


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train/test indices with the same class shares in both, fixed by ``seed``."""
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(labels))
    stratify = labels if (labels >= 0).all() and len(np.unique(labels)) > 1 else None
    train, test = train_test_split(indices, test_size=test_fraction, random_state=seed, stratify=stratify)
    return np.sort(train), np.sort(test)


def label_subset(labels: torch.Tensor, fraction: float, seed: int) -> np.ndarray:
    """Indices of a per-class ``fraction`` of the images (at least one per class), fixed by ``seed``."""
    rng = np.random.default_rng(seed)
    labels_np = labels.numpy()
    keep = []
    for cls in np.unique(labels_np):
        members = np.flatnonzero(labels_np == cls)
        count = max(1, int(round(fraction * len(members))))
        keep.append(rng.choice(members, size=count, replace=False))
    return np.sort(np.concatenate(keep))
