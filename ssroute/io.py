"""Atomic files: write to a temporary file in the same folder, then rename it into place.

A killed run never leaves a half-written ``metrics.json``, ``routing_history.pt``
or exported model behind: a reader sees the old file or the new one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_open(path: Path, mode: str = "w") -> Iterator[IO]:
    """An open temporary file that replaces ``path`` when the block ends without an error (and is removed otherwise)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """JSON with sorted keys, written atomically."""
    with atomic_open(path) as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.write("\n")


def save_atomic(payload: Any, path: Path, save: Callable[[Any, IO], None] | None = None) -> None:
    """``torch.save`` (or ``save(payload, handle)``) written atomically."""
    import torch

    with atomic_open(path, "wb") as handle:
        (save or torch.save)(payload, handle)


@contextmanager
def atomic_folder(path: Path) -> Iterator[Path]:
    """A temporary folder beside ``path`` that becomes ``path`` when the block ends without an error (removed otherwise).

    ``path`` must not exist yet: a reader sees no folder or the whole one, never a half-written export.
    """
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        yield tmp
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
