"""scikit-learn's bundled 8x8 handwritten digits: 1,797 grey images, 10 classes, no download.

The embedded default dataset: it ships with scikit-learn, so the quick start runs
on a machine without network. Pixel values 0..16 are rescaled to uint8 0..255.
"""

from __future__ import annotations

import numpy as np
import torch

from ssroute.data.base import DataBundle, ImageSet, channel_stats, stratified_split


def load_digits_bundle(cfg, seed: int) -> DataBundle:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    train_idx, test_idx = stratified_split(digits.target, cfg.test_fraction, seed)
    everything = ImageSet(images, labels)
    train = everything.subset(train_idx)
    mean, std = channel_stats(train.images)
    return DataBundle("digits", train, everything.subset(test_idx), 1, 8, 10, mean, std)
