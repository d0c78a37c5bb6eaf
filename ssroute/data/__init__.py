"""Datasets by name: ``build_data(cfg.data, seed)`` returns a :class:`DataBundle`.

>>> from ssroute.data import DATASETS
>>> sorted(DATASETS.names())
['cifar10', 'digits', 'fashion_mnist', 'image_folder', 'stl10', 'webdataset']
"""

from __future__ import annotations

from ssroute.data.base import UNLABELED, DataBundle, ImageSet, label_subset, stratified_split
from ssroute.data.digits import load_digits_bundle
from ssroute.data.fashion_mnist import load_fashion_mnist_bundle
from ssroute.data.image_folder import load_image_folder_bundle
from ssroute.data.torchvision_sets import load_cifar10_bundle, load_stl10_bundle
from ssroute.data.webdataset_bundle import load_webdataset_bundle
from ssroute.errors import ConfigError
from ssroute.registry import Registry

DATASETS: Registry = Registry("dataset")
DATASETS.register("digits")(load_digits_bundle)
DATASETS.register("fashion_mnist")(load_fashion_mnist_bundle)
DATASETS.register("cifar10")(load_cifar10_bundle)
DATASETS.register("stl10")(load_stl10_bundle)
DATASETS.register("image_folder")(load_image_folder_bundle)
DATASETS.register("webdataset")(load_webdataset_bundle)


def build_data(cfg, seed: int = 0) -> DataBundle:
    """Load the dataset ``cfg.name`` with its fixed, seeded splits."""
    bundle = DATASETS.get(cfg.name)(cfg, seed)
    if cfg.train_subset:
        bundle.train = bundle.train.subset(range(min(cfg.train_subset, len(bundle.train))))
    if len(bundle.train) == 0:
        raise ConfigError(f"dataset {cfg.name!r} has no training images; check data.root.")
    if cfg.get("val_fraction"):
        hold_out_validation(bundle, cfg.val_fraction, seed)
    return bundle


def hold_out_validation(bundle: DataBundle, fraction: float, seed: int) -> None:
    """Replace the held-out split by a stratified ``fraction`` of the labelled training images (in place).

    Recipes are tuned on this split; the test split is then scored once per reported run.
    """
    if not bundle.labeled:
        raise ConfigError(f"data.val_fraction={fraction} needs labelled training images; dataset {bundle.name!r} has none.")
    labelled = bundle.probe_train
    train_idx, val_idx = stratified_split(labelled.labels.numpy(), fraction, seed)
    if bundle.labeled_train is not None:  # unlabelled pretraining images stay; the labelled ones are split
        bundle.labeled_train = labelled.subset(train_idx)
    else:
        bundle.train = labelled.subset(train_idx)
    bundle.test = labelled.subset(val_idx)
    bundle.held_out = "val"


__all__ = ["DATASETS", "UNLABELED", "DataBundle", "ImageSet", "build_data", "label_subset"]
