"""CIFAR-10 and STL-10 through torchvision, downloaded only when ``data.download=true``.

CIFAR-10 (Krizhevsky 2009): 32x32 RGB, 50k/10k. STL-10 (Coates et al. 2011): 96x96
RGB; pretraining uses its 100k-image unlabelled split, evaluation its labelled
5k/8k train/test splits (``DataBundle.train`` holds the unlabelled images and
``DataBundle.labeled_train`` the labelled ones).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ssroute.data.base import DataBundle, ImageSet, channel_stats
from ssroute.errors import ConfigError


def _open(factory, root: Path, download: bool, name: str, **kwargs):
    try:
        return factory(str(root), download=download, **kwargs)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
        raise ConfigError(
            f"{name} was not found in {root} ({err}); set data.root to the folder that holds it, or add data.download=true on a machine with network."
        ) from None


def load_cifar10_bundle(cfg, seed: int) -> DataBundle:
    from torchvision.datasets import CIFAR10

    root = Path(cfg.root or "data/cifar10")
    sets = [_open(CIFAR10, root, cfg.download, "CIFAR-10", train=flag) for flag in (True, False)]
    train, test = (
        ImageSet(torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(s.targets, dtype=torch.long)) for s in sets
    )
    mean, std = channel_stats(train.images)
    return DataBundle("cifar10", train, test, 3, 32, 10, mean, std)


def load_stl10_bundle(cfg, seed: int) -> DataBundle:
    from torchvision.datasets import STL10

    root = Path(cfg.root or "data/stl10")
    unlabeled, labeled_train, test = (
        _open(STL10, root, cfg.download, "STL-10", split=split) for split in ("unlabeled", "train", "test")
    )

    def as_set(ds) -> ImageSet:
        labels = torch.from_numpy(np.asarray(ds.labels, dtype=np.int64))
        return ImageSet(torch.from_numpy(ds.data), labels)

    bundle_train = as_set(unlabeled)
    mean, std = channel_stats(bundle_train.images)
    return DataBundle("stl10", bundle_train, as_set(test), 3, 96, 10, mean, std, labeled_train=as_set(labeled_train))
