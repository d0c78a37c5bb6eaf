"""ssroute: self-supervised routing pretraining for vision mixture-of-experts transformers."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Importing torch-heavy modules lazily keeps `import ssroute` cheap for config tools.
    if name == "build_moe":
        from ssroute.moe import build_moe

        return build_moe
    if name == "load":
        from ssroute.pretrained import load

        return load
    raise AttributeError(f"module 'ssroute' has no attribute {name!r}")
