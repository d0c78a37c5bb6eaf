"""Lightning callbacks of the training runs: what is measured while training, apart from the step.

:class:`OnlineMonitor` measures the training as it goes — weighted kNN on a
fixed subset and routing agreement of corresponding patches on held-out images
under the training augmentations, with the same code as the final evaluation
(``ssroute.eval``) — every ``every_n_epochs`` epochs.

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

import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from ssroute.eval.features import evaluating
from ssroute.eval.fluctuation import fluctuation_metrics, top1_experts
from ssroute.eval.knn import knn_accuracy
from ssroute.io import save_atomic
from ssroute.moe import moe_layers


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
        self.time_s = 0.0  # wall time spent taking snapshots

    # -- recording --------------------------------------------------------------------------
    def _probe(self, pl_module: pl.LightningModule) -> torch.Tensor:
        if self._probe_images is None:
            data = pl_module.data
            self.probe_split, split = ("test", data.test) if data.test is not None else ("train", data.train)
            self.probe_count = min(self.probe_images, len(split))
            self._probe_images = torch.stack([split[i][0] for i in range(self.probe_count)])
        return self._probe_images

    def snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Record every MoE block's top-1 expert per probe token at the current step."""
        backbone = pl_module.backbone
        if not moe_layers(backbone):
            return
        start = time.perf_counter()
        images = self._probe(pl_module)
        found: dict[int, list[torch.Tensor]] = {}
        # eval mode, no autograd, own random stream: the probe must leave no trace in the training (exact resumes)
        with evaluating(backbone, seed=trainer.global_step):
            for chunk in images.split(self.batch_size):
                _, aux = backbone(pl_module.augment.normalize(chunk.to(pl_module.device)))
                for block, routing in aux.routings.items():
                    found.setdefault(block, []).append(top1_experts(routing))
                    self.tokens_per_image = routing.num_tokens // chunk.shape[0]
        for block, parts in found.items():
            self.snapshots.setdefault(f"blocks.{block}.ffn", []).append(torch.cat(parts).to("cpu", torch.int16))
        self.steps.append(trainer.global_step)
        self.time_s += time.perf_counter() - start

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
        return {**self.history(), "time_s": self.time_s}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.time_s = state_dict.get("time_s", 0.0)
        self.steps = [int(s) for s in state_dict["steps"]]
        self.snapshots = {name: list(experts.unbind(0)) for name, experts in state_dict["experts"].items()}
        self.probe_split, self.probe_count = state_dict["probe_split"], state_dict["probe_images"]
        self.tokens_per_image = state_dict["tokens_per_image"]


def monitor_every(knn_every_n_epochs: int | None, max_epochs: int, measurements: int = 10) -> int:
    """Epochs between online measurements: ``knn_every_n_epochs``, or for None about ``measurements`` per run (0 = off).

    >>> monitor_every(None, 150), monitor_every(None, 3), monitor_every(2, 150), monitor_every(0, 150)
    (15, 1, 2, 0)
    """
    if knn_every_n_epochs is None:
        return max(1, max_epochs // measurements)
    return int(knn_every_n_epochs)


class OnlineMonitor(pl.Callback):
    """kNN accuracy and routing agreement while training, every ``every_n_epochs`` epochs and at the end.

    Cheap by design, so that it stays a small share of the training time (the
    default period, :func:`monitor_every`, gives about ten measurements a run):
    the weighted kNN uses the first ``train_images`` labelled training images as
    references and the first ``held_out_images`` held-out images as queries;
    agreement pairs two views (the training augmentations) of the first
    ``routing_images`` held-out images once. The subsets are gathered once. Rank
    0 measures; the values go to the progress bar and the log (``monitor/...``),
    never into ``metrics.json``, which the full evaluation at the end writes; the
    time spent, ``time_s``, is kept across resumes and reported as
    ``monitor_time_s``.

    Args:
        every_n_epochs: epochs between measurements (positive).
        train_images, held_out_images, routing_images: subset sizes.
        batch_size: images per forward.
    """

    def __init__(
        self, every_n_epochs: int, train_images: int = 1024, held_out_images: int = 512, routing_images: int = 256, batch_size: int = 512
    ) -> None:
        if every_n_epochs <= 0:
            raise ValueError(f"every_n_epochs must be positive, got {every_n_epochs}")
        self.every_n_epochs, self.batch_size = every_n_epochs, batch_size
        self.sizes = (train_images, held_out_images, routing_images)
        self._sets: tuple[tuple[torch.Tensor, ...] | None, torch.Tensor] | None = None
        self.time_s = 0.0  # wall time spent measuring

    def _subsets(self, module: pl.LightningModule) -> tuple[tuple[torch.Tensor, ...] | None, torch.Tensor]:
        """``((train images, labels, held-out images, labels) or None without labels, routing images)``, gathered once."""
        if self._sets is None:
            from ssroute.eval.evaluation import held_out_images

            data, knn = module.data, None
            if data.labeled and data.test is not None:
                train = data.probe_train
                count = min(self.sizes[0], len(train))
                train_x = train.images[:count] if train.images is not None else torch.stack([train[i][0] for i in range(count)])
                knn = (train_x, train.labels[:count], *held_out_images(data, self.sizes[1]))
            self._sets = (knn, held_out_images(data, self.sizes[2])[0])
        return self._sets

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0 or trainer.current_epoch + 1 == trainer.max_epochs:
            self.measure(trainer, module)

    def measure(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        from ssroute.eval.stability import measure as measure_agreement

        start = time.perf_counter()
        metrics: dict[str, float] = {}
        backbone = module.backbone
        knn, routing_x = self._subsets(module)
        if knn is not None:
            train_x, train_y, test_x, test_y = knn
            embed = lambda x: torch.cat(
                [backbone(module.augment.normalize(c.to(module.device)))[0].float().cpu() for c in x.split(self.batch_size)]
            )  # noqa: E731
            with evaluating(backbone):
                metrics["knn_top1"] = knn_accuracy(embed(train_x), train_y, embed(test_x), test_y)
        if moe_layers(backbone):
            with evaluating(backbone, seed=trainer.global_step):
                stats = measure_agreement(
                    backbone, module.augment, routing_x.to(module.device), pairs=1, batch_size=self.batch_size
                ).compute()
            metrics.update({k: stats[k] for k in ("routing_agreement", "routing_agreement_chance")})
        for key, value in metrics.items():
            module.log(f"monitor/{key}", value, prog_bar=True, rank_zero_only=True)
        self.time_s += time.perf_counter() - start

    def state_dict(self) -> dict[str, Any]:
        return {"time_s": self.time_s}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.time_s = state_dict.get("time_s", 0.0)


__all__ = ["OnlineMonitor", "RoutingFluctuation", "monitor_every"]
