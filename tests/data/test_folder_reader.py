"""Large image folders are read lazily: no up-front decode, bad files skipped and counted at load time, the threshold kept."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import ssroute.data.folder_reader as folder_reader
import ssroute.data.image_folder as image_folder
from ssroute.config import DataConfig
from ssroute.data import build_data
from ssroute.data.loader import ResumableLoader, loader_workers
from ssroute.errors import ConfigError


def _folder(root, per_class=8, size=10, bad=()):
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size + 2), dtype=np.uint8), mode="L").save(root / name / f"{i:02d}.png")
    for path in bad:
        (root / path).write_bytes(b"\x89PNG truncated")  # a header PIL cannot open
    return root


def _build(root, lazy=True, monkeypatch=None, **data):
    if lazy:
        monkeypatch.setattr(image_folder, "EAGER_FILES", 4)  # everything above 4 files is read lazily
    return build_data(OmegaConf.structured(DataConfig(name="image_folder", root=str(root), **data)), seed=0)


def test_lazy_folder_decodes_only_a_sample_before_training_and_matches_the_eager_images(tmp_path, monkeypatch):
    root = _folder(tmp_path / "data", per_class=40)
    eager = _build(root, lazy=False)
    calls = []
    original = folder_reader.decode_image
    monkeypatch.setattr(folder_reader, "decode_image", lambda *a: calls.append(a[0]) or original(*a))
    monkeypatch.setattr(image_folder, "STATS_SAMPLE", 10)
    lazy = _build(root, monkeypatch=monkeypatch)
    assert len(calls) == 10  # the channel-statistics sample, no validation pass over all 80 files
    assert lazy.train.images is None and lazy.reader is not None and eager.reader is None
    assert torch.equal(torch.stack([lazy.train[i][0] for i in range(len(lazy.train))]), eager.train.images)
    assert torch.equal(lazy.train.labels, eager.train.labels)
    decoded = len(calls)
    again = [lazy.train[i][0] for i in range(len(lazy.train))]  # second epoch: from the shared cache
    assert len(calls) == decoded and torch.equal(torch.stack(again), eager.train.images)


def test_a_bad_file_is_skipped_at_load_time_counted_and_replaced_by_its_class(tmp_path, monkeypatch):
    root = _folder(tmp_path / "data", bad=["b/03.png"])
    bundle = _build(root, monkeypatch=monkeypatch, max_bad_fraction=0.1, test_fraction=0.25)
    reader = bundle.reader
    index = reader.files.index(str(root / "b" / "03.png"))
    image = reader(index)
    assert reader.bad_count() == 1 and reader.bad_files() == [str(root / "b" / "03.png")]
    assert torch.equal(image, reader(index + 1))  # the next readable file of class b takes its place
    assert int(reader.labels[index + 1]) == 1
    reader.check()  # 1 of 17 files is within 10%


def test_the_bad_file_threshold_still_applies_and_names_the_files(tmp_path, monkeypatch):
    root = _folder(tmp_path / "data", bad=["a/90.png", "a/91.png", "b/90.png"])
    bundle = _build(root, monkeypatch=monkeypatch, max_bad_fraction=0.1)  # 3 of 19 bad: found only when read
    loader = ResumableLoader(bundle.train, batch_size=2, seed=0)
    with pytest.raises(ConfigError, match=r"3 of 19 image files .* cannot be read .*90\.png"):
        for _ in loader:
            loader.check_data()  # the training module calls this as each step starts


def test_workers_decode_and_the_main_process_sees_their_bad_files(tmp_path, monkeypatch):
    root = tmp_path / "flat"
    root.mkdir()
    rng = np.random.default_rng(1)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (10, 10), dtype=np.uint8), mode="L").save(root / f"{i:02d}.png")
    (root / "05b.png").write_bytes(b"broken")  # sorts between 05 and 06: not in the two-image statistics sample
    monkeypatch.setattr(image_folder, "STATS_SAMPLE", 2)
    bundle = _build(root, monkeypatch=monkeypatch, max_bad_fraction=0.1)
    assert bundle.reader.bad_count() == 0  # nothing validated up front
    assert loader_workers(None, bundle.train) >= 1 and loader_workers(None, build_data(OmegaConf.structured(DataConfig()), 0).train) == 0
    with_workers = [b[0] for b in ResumableLoader(bundle.train, batch_size=4, seed=3, num_workers=2)]
    assert bundle.reader.bad_files() == [str(root / "05b.png")]  # flagged in a worker, seen here through shared memory
    in_process = [b[0] for b in ResumableLoader(bundle.train, batch_size=4, seed=3)]
    assert all(torch.equal(a, b) for a, b in zip(in_process, with_workers, strict=True))


def test_a_folder_whose_first_files_are_unreadable_is_the_same_error(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    for i in range(3):
        (root / f"{i}.png").write_bytes(b"nope")
    with pytest.raises(ConfigError, match=r"of 3 image files in .* cannot be read"):
        build_data(OmegaConf.structured(DataConfig(name="image_folder", root=str(root))), seed=0)
