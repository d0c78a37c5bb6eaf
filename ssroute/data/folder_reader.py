"""Lazy reading of a large image folder: decode in the loader's workers, cache small images, count bad files.

:class:`FolderReader` is the ``loader`` of a lazily read :class:`~ssroute.data.base.ImageSet`
(``index -> uint8 [channels, size, size]``). It lives in the main process and is
copied into each DataLoader worker; what the workers learn is kept in
shared-memory tensors, so every process sees it:

- ``bad``: one flag per file that failed to decode. A bad file's place goes to
  the next readable file of the same label (cyclically), so batches keep their
  size and a resumed run reads exactly what an uninterrupted one did.
  :meth:`FolderReader.check` — called by the training loader as each step
  starts — raises one :class:`~ssroute.errors.ConfigError` naming the files once
  more than ``max_bad`` have failed.
- ``cache``: decoded images, when the whole folder fits in
  ``cache_bytes`` (100,000 16x16 images take 25 MB), so each file is decoded
  once per run rather than once per epoch.

>>> import tempfile, pathlib
>>> from PIL import Image
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> Image.new("L", (6, 4), 200).save(folder / "a.png"); _ = (folder / "b.png").write_bytes(b"broken")
>>> reader = FolderReader([folder / "a.png", folder / "b.png"], [-1, -1], "L", 4, max_bad=1, root=folder)
>>> reader(1).shape, reader.bad_count(), reader(0).float().mean().item()
(torch.Size([1, 4, 4]), 1, 200.0)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ssroute.errors import ConfigError

CACHE_BYTES = 2 * 1024**3  # keep decoded images in shared memory when the whole folder fits


def image_header(path: str | Path) -> tuple[str, int] | None:
    """(mode ``L`` or ``RGB``, shorter side) from the file's header alone, or None when it cannot be opened."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return ("L" if img.mode in ("1", "L", "I;16", "I", "F") else "RGB"), min(img.size)
    except Exception:  # PIL raises many types for broken files
        return None


def decode_image(path: str | Path, mode: str, size: int) -> torch.Tensor | None:
    """uint8 ``[channels, size, size]``: converted to ``mode``, resized on the shorter side, centre-cropped; None if unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert(mode)  # a full decode: truncated pixel data fails here
            w, h = img.size
            if (w, h) != (size, size):
                scale = size / min(w, h)
                img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
                w, h = img.size
                left, top = (w - size) // 2, (h - size) // 2
                img = img.crop((left, top, left + size, top + size))
            array = np.asarray(img, dtype=np.uint8)
    except Exception:  # PIL raises many types for broken files
        return None
    return torch.from_numpy(array.copy()).reshape(size, size, -1).permute(2, 0, 1).contiguous()


class FolderReader:
    """``index -> image`` over a list of files, decoding lazily (see the module docstring).

    Args:
        files: image paths.
        labels: label per file (``-1`` unlabelled); a bad file is replaced by the next readable one with its label.
        mode: ``L`` or ``RGB``.
        size: square side of the decoded images.
        max_bad: unreadable files tolerated before :meth:`check` raises.
        root: the folder, for messages.
        cache_bytes: cache decoded images when all of them fit in this many bytes.
    """

    def __init__(
        self,
        files: list[str] | list[Path],
        labels: list[int],
        mode: str,
        size: int,
        max_bad: int,
        root: Path,
        cache_bytes: int = CACHE_BYTES,
    ) -> None:
        self.files, self.mode, self.size, self.max_bad, self.root = [str(f) for f in files], mode, size, max_bad, root
        self.labels = np.asarray(labels)
        self.bad = torch.zeros(len(files), dtype=torch.bool).share_memory_()
        channels = 1 if mode == "L" else 3
        fits = len(files) * channels * size * size <= cache_bytes
        self.cache = torch.zeros(len(files), channels, size, size, dtype=torch.uint8).share_memory_() if fits else None
        self.cached = torch.zeros(len(files), dtype=torch.bool).share_memory_() if fits else None

    def __len__(self) -> int:
        return len(self.files)

    def decode_or_mark(self, index: int) -> torch.Tensor | None:
        """The image of file ``index`` (cached when the folder fits), or None after marking the file bad."""
        index = int(index)
        if self.cached is not None and self.cached[index]:
            return self.cache[index]
        if self.bad[index]:
            return None
        image = decode_image(self.files[index], self.mode, self.size)
        if image is None:
            self.bad[index] = True
        elif self.cache is not None:
            self.cache[index] = image
            self.cached[index] = True
        return image

    def __call__(self, index: int) -> torch.Tensor:
        image = self.decode_or_mark(index)
        if image is not None:
            return image
        same = np.flatnonzero(self.labels == self.labels[index])
        start = int(np.searchsorted(same, index))
        for offset in range(1, len(same) + 1):
            image = self.decode_or_mark(int(same[(start + offset) % len(same)]))
            if image is not None:
                return image
        raise ConfigError(f"no file of label {int(self.labels[index])} in {self.root} can be read; remove or repair them.")

    def bad_count(self) -> int:
        return int(self.bad.sum())

    def bad_files(self) -> list[str]:
        return [self.files[i] for i in self.bad.nonzero().squeeze(1).tolist()]

    def check(self) -> None:
        """Raise once more than ``max_bad`` files have failed to decode."""
        count = self.bad_count()
        if count > self.max_bad:
            bad = self.bad_files()
            names = ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")
            raise ConfigError(
                f"{count} of {len(self.files)} image files in {self.root} cannot be read ({names}); "
                "remove or repair them, or raise data.max_bad_fraction."
            )
