import gzip

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ssroute.config import DataConfig
from ssroute.data import DATASETS, build_data, label_subset
from ssroute.errors import ConfigError


def data_cfg(**kwargs):
    return OmegaConf.structured(DataConfig(**kwargs))


def test_digits_shapes_labels_and_seeded_split():
    bundle = build_data(data_cfg(name="digits"), seed=0)
    assert bundle.train.images.shape == (1437, 1, 8, 8) and bundle.test.images.shape == (360, 1, 8, 8)
    assert bundle.train.images.dtype == torch.uint8 and int(bundle.train.images.max()) == 255
    assert bundle.num_classes == 10 and (bundle.image_size, bundle.channels) == (8, 1)
    assert set(bundle.train.labels.tolist()) == set(range(10))
    # stratified: every class keeps ~20% of its images in test
    counts = torch.bincount(bundle.test.labels, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38
    again = build_data(data_cfg(name="digits"), seed=0)
    assert torch.equal(again.test.images, bundle.test.images)
    other = build_data(data_cfg(name="digits"), seed=1)
    assert not torch.equal(other.test.images, bundle.test.images)


def _write_images(folder, count, size=12, mode="RGB"):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        shape = (size, size + 4, 3) if mode == "RGB" else (size, size + 4)
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode=mode).save(folder / f"{i}.png")


def test_image_folder_with_classes_skips_corrupt_and_non_image_files(tmp_path, caplog):
    for name in ("cat", "dog"):
        _write_images(tmp_path / name, 10)
    (tmp_path / "cat" / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    bundle = build_data(data_cfg(name="image_folder", root=str(tmp_path), test_fraction=0.2, max_bad_fraction=0.1), seed=0)
    assert bundle.num_classes == 2 and bundle.channels == 3 and bundle.image_size == 12
    assert len(bundle.train) + len(bundle.test) == 20  # the broken file is skipped
    assert bundle.train.images.shape[1:] == (3, 12, 12)
    assert "skipped 1 unreadable image(s) and 1 non-image file(s)" in caplog.text


def test_image_folder_too_many_corrupt_files_names_them(tmp_path):
    _write_images(tmp_path / "a", 3)
    _write_images(tmp_path / "b", 3)
    (tmp_path / "a" / "bad1.jpg").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match=r"1 of 7 image files .* cannot be read .*bad1\.jpg"):
        build_data(data_cfg(name="image_folder", root=str(tmp_path), max_bad_fraction=0.05), seed=0)


def test_flat_folder_is_unlabelled_and_resized(tmp_path):
    _write_images(tmp_path, 6, size=20, mode="L")
    bundle = build_data(data_cfg(name="image_folder", root=str(tmp_path), image_size=16), seed=0)
    assert bundle.num_classes is None and not bundle.labeled and bundle.test is None
    assert bundle.train.images.shape == (6, 1, 16, 16)
    assert (bundle.train.labels == -1).all()


@pytest.mark.parametrize("make", ["missing", "empty", "only_text"])
def test_image_folder_bad_roots(tmp_path, make):
    root = tmp_path / "data"
    if make != "missing":
        root.mkdir()
    if make == "only_text":
        (root / "a.txt").write_text("x")
    with pytest.raises(ConfigError, match="data.root="):
        build_data(data_cfg(name="image_folder", root=str(root)), seed=0)


def _write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 255, (30, 28, 28)))
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(30) % 10)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 255, (10, 28, 28)))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(10))
    bundle = build_data(data_cfg(name="fashion_mnist", root=str(tmp_path)), seed=0)
    assert bundle.train.images.shape == (30, 1, 28, 28) and bundle.test.labels.tolist() == list(range(10))


def test_fashion_mnist_missing_files_say_how_to_get_them(tmp_path):
    with pytest.raises(ConfigError, match="dataset-fashion-mnist"):
        build_data(data_cfg(name="fashion_mnist", root=str(tmp_path)), seed=0)


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ConfigError, match="unknown dataset 'imagenet'; choose one of: digits, fashion_mnist"):
        build_data(data_cfg(name="imagenet"), seed=0)


def test_cifar10_without_download_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="data.download=true"):
        build_data(data_cfg(name="cifar10", root=str(tmp_path)), seed=0)


def test_label_subset_keeps_a_share_of_every_class():
    labels = torch.arange(10).repeat(20)
    keep = label_subset(labels, 0.1, seed=0)
    assert torch.bincount(labels[keep]).tolist() == [2] * 10
    assert len(label_subset(labels, 0.001, seed=0)) == 10  # at least one per class


def test_registry_is_complete():
    assert set(DATASETS.names()) == {"digits", "fashion_mnist", "cifar10", "stl10", "image_folder", "webdataset"}


def test_val_fraction_holds_out_a_stratified_part_of_the_training_images():
    plain = build_data(OmegaConf.structured(DataConfig()), seed=0)
    tuned = build_data(OmegaConf.structured(DataConfig(val_fraction=0.25)), seed=0)
    assert tuned.held_out == "val" and plain.held_out == "test"
    assert len(tuned.train) + len(tuned.test) == len(plain.train)
    train_images = {bytes(image.numpy()) for image in tuned.train.images}
    assert not any(bytes(image.numpy()) in train_images for image in tuned.test.images[:50])  # no overlap
    test_images = {bytes(image.numpy()) for image in plain.test.images}
    assert not any(bytes(image.numpy()) in test_images for image in tuned.test.images)  # never the test split
    shares = torch.bincount(tuned.test.labels, minlength=10).float() / len(tuned.test)
    assert float((shares - torch.bincount(plain.train.labels, minlength=10).float() / len(plain.train)).abs().max()) < 0.02
