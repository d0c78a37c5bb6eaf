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
        if isinstance(loader, ResumableLoader):
            loader.mark_consumed()
        self._batch_images = batch[0].shape[0] * self.trainer.world_size
        self._clock = time.perf_counter()

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.after_optimizer_step()
        self.images_seen += self._batch_images
        self.train_time_s += time.perf_counter() - self._clock

    def after_optimizer_step(self) -> None:
        """Per-step updates that must be in the next checkpoint (EMA teachers, schedules)."""

    def find_moe_layers(self, model: torch.nn.Module) -> list:
        """The model's MoE layers, looked up once so steps do not walk the module tree."""
        from ssroute.layers.moe import MoELayer

        return [m for m in model.modules() if isinstance(m, MoELayer)]

    def moe_aux_loss(self) -> torch.Tensor | None:
        """Sum of the last forward's auxiliary router losses (None for a dense model)."""
        if not self.moe_layers:
            return None
        return torch.stack([layer.aux_loss.float() for layer in self.moe_layers]).sum()

    def log_routing(self, model: torch.nn.Module) -> None:
        """Per-expert load share and dropped-token share of every MoE block of ``model`` (this step)."""
        from ssroute.layers.moe import MoELayer

        for name, module in model.named_modules():
            if isinstance(module, MoELayer) and module.last_routing is not None:
                block = name.split(".")[1] if name.startswith("blocks.") else name
                load = module.last_load.float()
                for expert, share in enumerate(load / load.sum().clamp_min(1)):
                    self.log(f"block{block}/load_e{expert}", share)
                routing = module.last_routing
                self.log(f"block{block}/dropped", routing.num_dropped.float() / routing.num_tokens)

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
