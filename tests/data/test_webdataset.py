"""data=webdataset: tar shards scanned and checked up front, streamed per rank and worker, resumed exactly."""

from __future__ import annotations

import tarfile

import pytest
import torch
from omegaconf import OmegaConf

from ssroute.config import DataConfig
from ssroute.data import build_data
from ssroute.data.shard_loader import ShardLoader
from ssroute.data.shards import SIZES_FILE, bytes_png, scan_shards, write_shards
from ssroute.errors import ConfigError


def _samples(count: int, labels: bool = True) -> list[tuple[bytes, int | None]]:
    """Sample ``n`` is a 4x4 grey PNG of value ``n``: every image tells which sample it is."""
    return [(bytes_png(4, n), n % 3 if labels else None) for n in range(count)]


def _shards(folder, count=60, per_shard=10, labels=True, prefix="shard") -> str:
    paths = write_shards(folder, _samples(count, labels), per_shard, prefix=prefix)
    return f"{folder}/{prefix}-{{000000..{len(paths) - 1:06d}}}.tar"


def _bundle(urls, **data):
    return build_data(OmegaConf.structured(DataConfig(name="webdataset", urls=urls, **data)), seed=0)


def _epoch(loader: ShardLoader, epoch: int, stop: int | None = None) -> list[list[int]]:
    """Sample numbers of each batch of ``epoch``; every image must show its own number."""
    iterator = iter(loader)  # Lightning creates the iterator before it calls set_epoch
    loader.epochs.set_epoch(epoch)
    batches = []
    for images, _, numbers in iterator:
        assert torch.equal(images[:, 0, 0, 0].long(), numbers)
        loader.mark_consumed()
        batches.append(numbers.tolist())
        if len(batches) == stop:
            break
    return batches


def test_scan_counts_from_sizes_json_or_the_tar_headers_and_builds_the_bundle(tmp_path):
    urls = _shards(tmp_path / "a", count=25, per_shard=10)
    assert scan_shards(urls).sizes == [10, 10, 5]
    (tmp_path / "a" / SIZES_FILE).unlink()
    assert scan_shards(urls).sizes == [10, 10, 5]  # counted from the headers
    bundle = _bundle(urls, probe_images=20, test_fraction=0.25)
    assert (bundle.train_count, len(bundle.train), len(bundle.test), bundle.num_classes) == (25, 15, 5, 3)
    assert (bundle.channels, bundle.image_size) == (1, 4) and bundle.train.images.dtype == torch.uint8
    unlabelled = _bundle(_shards(tmp_path / "b", count=12, labels=False), probe_images=8, image_size=2)
    assert unlabelled.num_classes is None and unlabelled.test is None and unlabelled.train.images.shape == (8, 1, 2, 2)
    held_out = _bundle(urls, test_urls=_shards(tmp_path / "c", count=6, prefix="test"), probe_images=20)
    assert len(held_out.train) == 20 and held_out.test.labels.tolist() == [0, 1, 2, 0, 1, 2]


def test_per_rank_shards_are_disjoint_and_cover_the_data_in_a_seeded_order(tmp_path):
    stream = _bundle(_shards(tmp_path, count=60, per_shard=10)).stream
    seen = []
    for rank in range(2):
        loader = ShardLoader(stream, batch_size=5, seed=1, rank=rank, world_size=2)
        for workers in (1, 3):  # logical workers of the rank: one shard each with three
            numbers = [n for w in range(workers) for batch in _worker(loader, 4, w, workers) for n in batch]
            assert len(numbers) == len(loader) * 5 == 30 and len(set(numbers)) == 30
        seen.append(set(numbers))
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(60))
    loader = ShardLoader(stream, batch_size=5, seed=1)
    assert _epoch(loader, 2) == _epoch(loader, 2) != _epoch(loader, 3)
    assert _epoch(loader, 2) != _epoch(ShardLoader(stream, batch_size=5, seed=2), 2)


def _worker(loader: ShardLoader, epoch: int, worker: int, workers: int) -> list[list[int]]:
    stream = loader.dataset
    stream.epoch, stream.skip = epoch, 0
    return [numbers.tolist() for _, _, numbers in stream.worker_batches(worker, workers)]


@pytest.mark.parametrize("workers,sizes", [(0, [10] * 6), (2, [10] * 6), (2, [9, 4, 12, 7, 10])])
def test_resume_after_k_batches_continues_with_exactly_the_same_samples(tmp_path, workers, sizes):
    samples = _samples(sum(sizes))
    for i, size in enumerate(sizes):  # shards of uneven sizes: some workers read theirs twice
        write_shards(tmp_path, samples[sum(sizes[:i]) : sum(sizes[: i + 1])], size, prefix=f"s{i}")
    urls = "::".join(f"{tmp_path}/s{i}-000000.tar" for i in range(len(sizes)))
    stream = _bundle(urls, shuffle_buffer=8).stream
    full = ShardLoader(stream, batch_size=4, seed=0, num_workers=workers)
    expected = _epoch(full, 1)
    assert len(expected) == len(full) == sum(sizes) // 4
    for k in (1, 3, 4):
        interrupted = ShardLoader(stream, batch_size=4, seed=0, num_workers=workers)
        assert _epoch(interrupted, 1, stop=k) == expected[:k]
        state = interrupted.state_dict()
        assert state == {"epoch": 1, "consumed": k, "workers": max(1, workers)}
        resumed = ShardLoader(stream, batch_size=4, seed=0, num_workers=0 if workers else 2)  # the checkpoint's count wins
        resumed.load_state_dict(state)
        assert _epoch(resumed, 1) == expected[k:]
        assert len(_epoch(resumed, 2)) == len(expected)  # the next epoch starts from its beginning


def test_an_undecodable_image_is_replaced_and_counted_and_too_many_stop_training(tmp_path):
    samples = _samples(20)
    samples[3] = (b"\x89PNG broken", 0)
    write_shards(tmp_path, samples, 10)
    stream = _bundle(f"{tmp_path}/shard-{{000000..000001}}.tar", probe_images=20, max_bad_fraction=0.0).stream
    loader = ShardLoader(stream, batch_size=4, seed=0)
    loader.epochs.set_epoch(0)
    batches = list(loader)
    assert len(batches) == 5 and int(stream.bad) == 1
    with pytest.raises(ConfigError, match="1 samples in data.urls have no image that decodes"):
        loader.check_data()


def _tar(path, members: dict[str, bytes]) -> None:
    import io

    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_bad_shards_get_one_sentence_naming_the_problem_and_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="needs data.urls=PATTERN"):
        _bundle(None)
    with pytest.raises(ConfigError, match=r"matched no shard at .*missing-000002.tar' \(2 of 4 missing\); check the path"):
        _shards(tmp_path / "m", count=20)
        _bundle(f"{tmp_path}/m/shard-{{000000..000001}}.tar::{tmp_path}/m/missing-{{000002..000003}}.tar")
    (tmp_path / "broken.tar").write_bytes(b"not a tar file at all" * 40)
    with pytest.raises(ConfigError, match="broken.tar in data.urls is not a readable tar file .*rewrite it or drop it"):
        _bundle(str(tmp_path / "broken.tar"))
    _tar(tmp_path / "nokey.tar", {"a.png": bytes_png(4, 1), "b.txt": b"caption"})
    with pytest.raises(ConfigError, match="sample 'b' in shard .*nokey.tar has no image file .*e.g. b.png"):
        _bundle(str(tmp_path / "nokey.tar"))
    _tar(tmp_path / "mixed.tar", {"a.png": bytes_png(4, 1), "a.cls": b"1", "b.png": bytes_png(4, 2)})
    with pytest.raises(ConfigError, match="1 of the first 2 samples in data.urls have a .cls label"):
        _bundle(str(tmp_path / "mixed.tar"))
    with pytest.raises(ConfigError, match="1 shard\\(s\\) for 2 processes"):
        ShardLoader(_bundle(str(tmp_path / "nokey.tar").replace("nokey", "m/shard-000000"), test_fraction=0.5).stream, 4, 0, world_size=2)
    with pytest.raises(ConfigError, match="data.train_subset does not apply"):
        _bundle(str(tmp_path / "m/shard-000000.tar"), train_subset=5)


def _digit_shards(folder) -> str:
    """scikit-learn's 1,797 digits as 8x8 PNGs with their labels, in six shards."""
    import io

    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    samples = []
    for image, label in zip(np.round(digits.images * (255.0 / 16.0)).astype(np.uint8), digits.target, strict=True):
        buffer = io.BytesIO()
        Image.fromarray(image, mode="L").save(buffer, format="PNG")
        samples.append((buffer.getvalue(), int(label)))
    write_shards(folder, samples, 300)
    return f"{folder}/shard-{{000000..000005}}.tar"


@pytest.mark.slow
def test_pretraining_on_shards_completes_and_a_killed_run_resumes_to_the_same_weights(tmp_path, pretrain_cfg, monkeypatch):
    import json

    from ssroute.train.pretrain import run_pretrain
    from ssroute.train.pretrain_module import PretrainModule

    def cfg(*extra):
        urls = _digit_shards(tmp_path / "shards")  # 1,797 samples: 14 steps of 128 per epoch
        return pretrain_cfg(["data=webdataset", f"data.urls='{urls}'", "data.num_workers=2", "data.shuffle_buffer=200", *extra])

    def weights(run):
        state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
        return {k: v for k, v in state.items() if k.startswith("backbone.")}

    straight = run_pretrain(cfg(), tmp_path / "a" / "run")
    metrics = json.loads((straight / "metrics.json").read_text())
    assert metrics["steps"] == 28 and metrics["unreadable_images"] == 0
    original = PretrainModule.on_train_batch_end

    def killed(self, outputs, batch, batch_idx):
        original(self, outputs, batch, batch_idx)
        if self.global_step == 20:  # checkpoints every 3 steps: the last one, step 18, is mid-epoch 2
            raise RuntimeError("simulated kill")

    monkeypatch.setattr(PretrainModule, "on_train_batch_end", killed)
    with pytest.raises(RuntimeError, match="simulated kill"):
        run_pretrain(cfg(), tmp_path / "b" / "run")
    monkeypatch.setattr(PretrainModule, "on_train_batch_end", original)
    resumed = run_pretrain(cfg("resume=true"), tmp_path / "b" / "fresh")
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
