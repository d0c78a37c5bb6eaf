"""What every training module shares: per-step seeding, resumable data position, wall-clock accounting.

Lightning calls callbacks' ``on_train_batch_end`` (the checkpoint writer among
them) before the module's, so everything a checkpoint must contain about a step
— the consumed-batch count, EMA teachers, timing — is updated by the time the
optimiser has stepped, never later.
"""

from __future__ import annotations

import time
from typing import Any

import pytorch_lightning as pl
import torch

from ssroute.data.loader import ResumableLoader
from ssroute.data.shard_loader import ShardLoader


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stops and the last good checkpoint is kept."""


class ResumableModule(pl.LightningModule):
    """Base class: subclasses set ``self.cfg`` and may override :meth:`after_optimizer_step`."""

    def __init__(self) -> None:
        super().__init__()
        self.train_time_s = 0.0  # wall time spent in training steps, kept across resumes
        self.images_seen = 0  # training images processed, all ranks together
        self._clock = 0.0
        self._batch_images = 0

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Augmentation and dropout randomness depend only on (seed, step, rank): resumes repeat exactly.
        torch.manual_seed(self.cfg.seed * 1_000_003 + self.global_step * 7919 + self.global_rank)
        loader = self.trainer.train_dataloader
        if isinstance(loader, (ResumableLoader, ShardLoader)):
            loader.mark_consumed()
            loader.check_data()
        self._batch_images = batch[0].shape[0] * self.trainer.world_size
        self._clock = time.perf_counter()

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.after_optimizer_step()
        self.images_seen += self._batch_images
        self.train_time_s += time.perf_counter() - self._clock

    def after_optimizer_step(self) -> None:
        """Per-step updates that must be in the next checkpoint (EMA teachers, schedules)."""

    def log_routing(self, aux) -> None:
        """Per-expert load share and dropped-token share of every routed block of this step's forward
        (``aux``: a :class:`~ssroute.models.vit.ForwardAux`), and the ``depth/*`` statistics of routing over depth.

        Only on the steps whose metrics Lightning writes (every ``trainer.log_every_n_steps``): gathering a
        value per expert costs about as much as the MoE layer's own routing on small models.
        """
        if (self.global_step + 1) % max(1, self.trainer.log_every_n_steps):
            return
        values: dict[str, float] = {}
        for block, routing in aux.routings.items():
            load = routing.load().float()
            shares = (load / load.sum().clamp_min(1)).tolist()
            values.update({f"block{block}/load_e{expert}": share for expert, share in enumerate(shares)})
            values[f"block{block}/dropped"] = float(routing.num_dropped) / routing.num_tokens
        if values:
            self.log_dict(values)
        if aux.depth is not None:
            from ssroute.models.depth_router import depth_stack
            from ssroute.models.depth_stats import DepthStats

            stack = depth_stack(self.backbone)
            stats = DepthStats(stack.max_steps, stack.num_choices, stack.num_blocks)
            stats.add(aux.depth.picks, aux.depth.halted_at, aux.depth.ponder)
            self.log_dict(stats.summary(stack.names, order=False))

    @property
    def progress(self) -> float:
        """Share of training done, 0 -> 1."""
        return self.global_step / max(1, self.trainer.estimated_stepping_batches)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["ssroute"] = {"train_time_s": self.train_time_s, "images_seen": self.images_seen}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("ssroute", {})
        self.train_time_s = state.get("train_time_s", 0.0)
        self.images_seen = state.get("images_seen", 0)
