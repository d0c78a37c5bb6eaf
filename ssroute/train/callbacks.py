"""Lightning callbacks of the training runs.

:class:`RoutingFluctuation` records how routing moves during training
(StableMoE, Dai et al. 2022, arXiv 2204.08396; the metrics are in
:mod:`ssroute.eval.fluctuation`): every ``every_n_steps`` optimiser steps, at the
start and at the end, it runs the backbone in eval mode without autograd on a
fixed, un-augmented probe set — the first ``probe_images`` images of the test
split (the train split when there is none) — and keeps each MoE block's top-1
expert per probe token. The history is callback state, so it is saved in
``checkpoints/last.ckpt`` and a killed and resumed run ends with the same
record; at the end it is written to ``<run>/routing_history.pt``:

``{"steps": [snapshots] long, "experts": {"blocks.1.ffn": [snapshots, probe_images * tokens] int16},
"probe_split": "test" | "train", "probe_images": int, "tokens_per_image": int}``

>>> callback = RoutingFluctuation(every_n_steps=25)
>>> callback.steps, callback.metrics()
([], {})
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from ssroute.eval.fluctuation import fluctuation_metrics, top1_experts
from ssroute.layers.moe import MoELayer, record_routing


class RoutingFluctuation(pl.Callback):
    """Top-1 routing snapshots of a fixed probe set over training.

    The module must have ``backbone``, ``augment.normalize`` (uint8 -> model
    input) and ``data`` (a :class:`~ssroute.data.DataBundle`), as the pretraining
    and fine-tuning modules do; a backbone without MoE layers records nothing.

    Args:
        every_n_steps: optimiser steps between snapshots (positive).
        probe_images: images in the probe set (the first ones of the split).
        batch_size: images per probe forward.
        run_dir: where ``routing_history.pt`` goes at the end; None = not written.
    """

    def __init__(self, every_n_steps: int, probe_images: int = 256, batch_size: int = 512, run_dir: Path | None = None) -> None:
        if every_n_steps <= 0:
            raise ValueError(f"every_n_steps must be positive, got {every_n_steps}")
        self.every_n_steps, self.probe_images, self.batch_size = every_n_steps, probe_images, batch_size
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.steps: list[int] = []
        self.snapshots: dict[str, list[torch.Tensor]] = {}  # block name -> one [probe tokens] int16 tensor per snapshot
        self.probe_split = ""  # which split the probe images came from
        self.probe_count = 0  # probe images actually used (fewer when the split is smaller)
        self.tokens_per_image = 0
        self._probe_images: torch.Tensor | None = None  # uint8 [probe_count, C, H, W], gathered once

    # -- recording --------------------------------------------------------------------------
    def _probe(self, pl_module: pl.LightningModule) -> torch.Tensor:
        if self._probe_images is None:
            data = pl_module.data
            self.probe_split, split = ("test", data.test) if data.test is not None else ("train", data.train)
            self.probe_count = min(self.probe_images, len(split))
            self._probe_images = torch.stack([split[i][0] for i in range(self.probe_count)])
        return self._probe_images

    @torch.no_grad()
    def snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Record every MoE block's top-1 expert per probe token at the current step."""
        backbone = pl_module.backbone
        layers = [m for m in backbone.modules() if isinstance(m, MoELayer)]
        if not layers:
            return
        images = self._probe(pl_module)
        modes = {m: m.training for m in backbone.modules()}
        # the probe must not leave traces: the MoE layers' last routing feeds accounting, and
        # randomness (random routers) must stay where training expects it for exact resumes
        kept = [(m.aux_loss, m.last_routing, m.last_load) for m in layers]
        backbone.eval()
        devices = [pl_module.device.index or 0] if pl_module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), record_routing(backbone) as recorded:
            for chunk in images.split(self.batch_size):
                backbone(pl_module.augment.normalize(chunk.to(pl_module.device)))
        for module, training in modes.items():
            module.training = training
        for layer, (aux, routing, load) in zip(layers, kept, strict=True):
            layer.aux_loss, layer.last_routing, layer.last_load = aux, routing, load
        for name, routings in recorded.items():
            top1 = torch.cat([top1_experts(r) for r in routings]).to("cpu", torch.int16)
            self.snapshots.setdefault(name, []).append(top1)
            self.tokens_per_image = routings[0].tokens_per_group
        self.steps.append(trainer.global_step)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.steps:  # a resumed run already holds its earlier snapshots
            self.snapshot(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        # runs before the checkpoint callback of the same step, so the checkpoint holds this snapshot
        if trainer.global_step % self.every_n_steps == 0 and (not self.steps or self.steps[-1] != trainer.global_step):
            self.snapshot(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.steps or self.steps[-1] != trainer.global_step:
            self.snapshot(trainer, pl_module)
        if not self.steps:
            return
        if hasattr(pl_module, "final_metrics"):  # pretraining writes these into metrics.json
            pl_module.final_metrics.update(self.metrics())
        if self.run_dir is not None and trainer.is_global_zero:
            save_atomic(self.history(), self.run_dir / "routing_history.pt")

    # -- results and state ------------------------------------------------------------------
    def history(self) -> dict[str, Any]:
        """What ``routing_history.pt`` holds (see the module docstring)."""
        return {
            "steps": torch.tensor(self.steps, dtype=torch.long),
            "experts": {name: torch.stack(parts) for name, parts in self.snapshots.items()},
            "probe_split": self.probe_split,
            "probe_images": self.probe_count,
            "tokens_per_image": self.tokens_per_image,
        }

    def metrics(self) -> dict[str, float]:
        """``block{i}/routing_fluctuation``, ``routing_fluctuation``, ``block{i}/routing_last_change_step_mean``."""
        if not self.snapshots:
            return {}
        history = self.history()
        return fluctuation_metrics(history["experts"], history["steps"])

    def state_dict(self) -> dict[str, Any]:
        return self.history()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = [int(s) for s in state_dict["steps"]]
        self.snapshots = {name: list(experts.unbind(0)) for name, experts in state_dict["experts"].items()}
        self.probe_split, self.probe_count = state_dict["probe_split"], state_dict["probe_images"]
        self.tokens_per_image = state_dict["tokens_per_image"]


def save_atomic(payload: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as handle:
        torch.save(payload, handle)
    os.replace(tmp, path)


def fluctuation_metrics_of(trainer: pl.Trainer) -> dict[str, float]:
    """The routing-fluctuation metrics of ``trainer``'s :class:`RoutingFluctuation` callback ({} without one)."""
    for callback in trainer.callbacks:
        if isinstance(callback, RoutingFluctuation):
            return callback.metrics()
    return {}


__all__ = ["RoutingFluctuation", "fluctuation_metrics_of", "save_atomic"]
