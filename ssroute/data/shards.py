"""WebDataset tar shards: list them, count their samples, check their keys, read a few into memory.

A shard is a tar file whose members are grouped into samples by name: ``0001.png`` and
``0001.cls`` are the image and the integer label of sample ``0001`` (the WebDataset
format, Aizman et al., "High Performance I/O For Large Scale Deep Learning", 2019).
``data.urls`` is brace-expanded (``shards/train-{000000..000009}.tar``; ``::`` joins
lists) and may hold local paths or URLs (``https://``, ``pipe:``): the ``webdataset``
package opens both.

:func:`scan_shards` counts the samples of every shard before anything trains: the
counts fix the epoch length and number the samples. They come from a ``sizes.json``
beside the shards (``{"train-000000.tar": 10000, ...}``, the file OpenCLIP's loaders
read; :func:`write_shards` writes it) or, for shards it does not list, from the shards'
tar headers, read once in parallel threads. That scan also reports a shard that is not a tar file and a sample without an
image in one sentence before any compute. The image bytes are read later, in the
loader's workers (:mod:`ssroute.data.shard_stream`).

>>> import tempfile, pathlib
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> write_shards(folder, [(bytes_png(4, 7), 1), (bytes_png(4, 9), 0), (bytes_png(4, 3), 1)], per_shard=2)
['...shard-000000.tar', '...shard-000001.tar']
>>> index = scan_shards(f"{folder}/shard-{{000000..000001}}.tar")
>>> index.sizes, index.offsets, len(index)
([2, 1], [0, 2], 3)
>>> (folder / "sizes.json").unlink(); scan_shards(f"{folder}/shard-{{000000..000001}}.tar").sizes  # from the tar headers
[2, 1]
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ssroute.errors import ConfigError

log = logging.getLogger(__name__)

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp", "bmp", "ppm", "pgm", "tif", "tiff", "gif")
LABEL_KEY = "cls"
SIZES_FILE = "sizes.json"  # {shard file name: samples} beside the shards (the convention of OpenCLIP's loaders)


def _webdataset(option: str):
    try:
        import webdataset
    except ImportError:
        raise ConfigError(f"{option} needs the webdataset package; pip install 'ssroute[webdataset]'.") from None
    return webdataset


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://") or url.startswith("pipe:")


@dataclass
class ShardIndex:
    """The shards of one brace-expanded list and their sample counts."""

    urls: list[str]  # one per shard, in listing order
    sizes: list[int]  # samples per shard
    option: str  # the config key the list came from, for messages

    @property
    def offsets(self) -> list[int]:
        """Global number of each shard's first sample (samples are numbered in listing order)."""
        return [sum(self.sizes[:i]) for i in range(len(self.sizes))]

    def __len__(self) -> int:
        return sum(self.sizes)


def expand_urls(urls: str, option: str) -> list[str]:
    """The shard list of ``urls``; a local path that does not exist is an error naming it."""
    if not urls:
        raise ConfigError(f"data=webdataset needs {option}=PATTERN, tar shards such as 'shards/train-{{000000..000009}}.tar'.")
    listed = _webdataset(option).shardlists.expand_urls(str(urls))
    missing = [u for u in listed if not is_remote(u) and not os.path.isfile(u.removeprefix("file://"))]
    if missing:
        raise ConfigError(
            f"{option}={urls!r} matched no shard at {missing[0]!r}"
            + (f" ({len(missing)} of {len(listed)} missing)" if len(listed) > 1 else "")
            + "; check the path and the brace range, e.g. 'shards/train-{000000..000009}.tar'."
        )
    return listed


def known_sizes(urls: list[str], option: str) -> list[int | None]:
    """Sample counts from a ``sizes.json`` (``{shard file name: samples}``) beside the shards, None where it says nothing."""
    wds, tables = _webdataset(option), {}
    for folder in dict.fromkeys(url.rsplit("/", 1)[0] if "/" in url else "." for url in urls):
        try:
            with wds.gopen(f"{folder}/{SIZES_FILE}") as stream:
                tables[folder] = json.load(stream)
        except Exception:  # no sizes.json there (a missing file, a 404, a failing pipe): count from the headers
            tables[folder] = {}
    sizes = []
    for url in urls:
        folder, name = url.rsplit("/", 1) if "/" in url else (".", url)
        size = tables[folder].get(name)
        sizes.append(int(size) if size is not None else None)
    return sizes


def _scan_one(url: str, option: str) -> int:
    """Samples in one shard, from its tar headers; a sample without an image or an unreadable tar is an error."""
    wds = _webdataset(option)
    count, key, members = 0, None, set()

    def close(key: str, members: set[str]) -> None:
        if not any(m.rsplit(".", 1)[-1] in IMAGE_KEYS for m in members):
            raise ConfigError(
                f"sample {key!r} in shard {url} has no image file ({', '.join(IMAGE_KEYS)}); "
                f"every sample needs one, e.g. {key.rsplit('/', 1)[-1]}.png — rewrite the shard."
            )

    try:
        with wds.gopen(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                prefix, suffix = wds.tariterators.base_plus_ext(info.name) if info.isreg() else (None, None)
                if prefix is None:
                    continue
                if prefix != key:
                    if key is not None:
                        close(key, members)
                        count += 1
                    key, members = prefix, set()
                members.add(suffix.lower())
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ConfigError(f"shard {url} in {option} is not a readable tar file ({exc}); rewrite it or drop it from {option}.") from None
    if key is None:
        raise ConfigError(f"shard {url} in {option} holds no samples; rewrite it or drop it from {option}.")
    close(key, members)
    return count + 1


def scan_shards(urls: str, option: str = "data.urls") -> ShardIndex:
    """List the shards of ``urls`` and count their samples (see the module docstring); one sentence per problem."""
    listed = expand_urls(urls, option)
    sizes = known_sizes(listed, option)
    unknown = [url for url, size in zip(listed, sizes, strict=True) if size is None]
    if unknown:
        log.info("counting the samples of %d shard(s) from their tar headers; a %s beside them skips this", len(unknown), SIZES_FILE)
        with ThreadPoolExecutor(max_workers=min(16, len(unknown))) as pool:
            counted = dict(zip(unknown, pool.map(lambda u: _scan_one(u, option), unknown), strict=True))
        sizes = [counted.get(url, size) for url, size in zip(listed, sizes, strict=True)]
    return ShardIndex(listed, sizes, option)


def read_samples(index: ShardIndex, limit: int) -> list[dict]:
    """The first ``limit`` raw samples (dicts of bytes by key) of the shards, in listing order."""
    wds = _webdataset(index.option)
    samples = []
    for url in index.urls:
        for sample in wds.tarfile_samples([{"url": url}]):
            samples.append(sample)
            if len(samples) >= limit:
                return samples
    return samples


def bytes_png(size: int, value: int, mode: str = "L") -> bytes:
    """A ``size`` x ``size`` PNG of one grey ``value`` (tests and examples)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new(mode, (size, size), value).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(
    folder, samples: list[tuple[bytes, int | None]], per_shard: int, ext: str = "png", prefix: str = "shard", sizes: bool = True
) -> list[str]:
    """Write ``(image bytes, label or None)`` samples into tar shards of ``per_shard`` samples, and a ``sizes.json``
    beside them unless ``sizes=False``; returns the shard paths. Each shard is written atomically."""
    from webdataset import TarWriter

    from ssroute.io import atomic_open, write_json_atomic

    os.makedirs(folder, exist_ok=True)
    paths, counts = [], {}
    for start in range(0, len(samples), per_shard):
        path = os.path.join(str(folder), f"{prefix}-{start // per_shard:06d}.tar")
        with atomic_open(Path(path), "wb") as stream, TarWriter(stream, mtime=0) as sink:  # whole-second mtime: plain ustar headers
            for number, (image, label) in enumerate(samples[start : start + per_shard], start):
                sink.write({"__key__": f"{number:09d}", ext: image, **({} if label is None else {LABEL_KEY: str(label).encode()})})
        paths.append(path)
        counts[os.path.basename(path)] = len(samples[start : start + per_shard])
    if sizes:
        sizes_path = Path(folder) / SIZES_FILE
        known = json.loads(sizes_path.read_text()) if sizes_path.is_file() else {}
        write_json_atomic(sizes_path, {**known, **counts})
    return paths
