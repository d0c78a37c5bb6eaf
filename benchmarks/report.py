"""What every benchmark writes next to its numbers: the machine, and the JSON plus markdown results."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path


def machine() -> dict:
    """CPU model, core count and torch version of this machine."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__}


def write_results(out: Path, stem: str, report: dict, text: str) -> None:
    """``out/stem.json`` (the report) and ``out/stem.md`` (its table), and the table on stdout."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{stem}.md").write_text(text)
    print(text)
