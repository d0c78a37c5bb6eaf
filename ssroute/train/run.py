"""What both entry points share: run folders, resuming, the Trainer, metrics.json.

Every run is a folder (Hydra's output dir): the resolved ``config.yaml``,
``checkpoints/`` (``last.ckpt`` every N steps and at the end; Lightning writes
them through an fsspec transaction, so a kill never leaves a half-written file),
``logs/`` (CSV, TensorBoard when installed) and ``metrics.json`` (flat keys,
written atomically). A run without ``metrics.json`` is unfinished and can be
resumed.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from ssroute.errors import ConfigError

log = logging.getLogger(__name__)


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def quiet_third_party_logs() -> None:
    """Hide Lightning's product tip; keep everything else."""
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_DropAdverts())


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON to a temporary file in the same folder, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.write("\n")
    os.replace(tmp, path)


def find_resume_dir(resume: Any, runs_root: Path) -> Path | None:
    """The run folder to resume: None (fresh run), a given path, or the newest unfinished run."""
    if resume in (False, None, "false", "False", ""):
        return None
    if resume in (True, "true", "True"):
        candidates = [p.parent.parent for p in runs_root.glob("*/checkpoints/last.ckpt") if not (p.parent.parent / "metrics.json").exists()]
        if not candidates:
            raise ConfigError(f"resume=true found no unfinished run with checkpoints/last.ckpt under {runs_root}; pass resume=RUN_FOLDER instead.")
        return max(candidates, key=lambda p: (p / "checkpoints" / "last.ckpt").stat().st_mtime)
    path = Path(str(resume))
    if not (path / "checkpoints" / "last.ckpt").exists():
        raise ConfigError(f"resume={path} has no checkpoints/last.ckpt to resume from; pass a run folder that a killed run left behind.")
    return path


def resumed_config(run_dir: Path, requested: DictConfig) -> DictConfig:
    """The config of the run being resumed (its own config.yaml wins over new overrides)."""
    saved = OmegaConf.load(run_dir / "config.yaml")
    saved.resume = requested.resume
    return saved


def save_config(cfg: DictConfig, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)


def build_trainer(cfg: DictConfig, run_dir: Path, callbacks: list[pl.Callback], check_val_every_n_epoch: int | None) -> pl.Trainer:
    """A Lightning Trainer for ``cfg.trainer`` writing into ``run_dir``.

    MoE models also get :class:`~ssroute.train.callbacks.RoutingFluctuation`
    (every ``trainer.fluctuation_every_n_steps`` steps; 0 = off).
    """
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger

    from ssroute.train.callbacks import RoutingFluctuation

    loggers: list = [CSVLogger(str(run_dir), name="logs", version="")]
    try:
        import tensorboard  # noqa: F401
        from pytorch_lightning.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(str(run_dir), name="logs", version="tensorboard"))
    except ImportError:
        pass
    checkpoint = ModelCheckpoint(
        dirpath=str(run_dir / "checkpoints"),
        filename="last",
        every_n_train_steps=cfg.trainer.checkpoint_every_n_steps,
        save_last=False,
        save_top_k=1,
        save_on_train_epoch_end=True,
        enable_version_counter=False,
    )
    t = cfg.trainer
    every = t.get("fluctuation_every_n_steps", 0)  # configs saved before the key existed have none
    if every and cfg.model.moe_layers:
        callbacks = [*callbacks, RoutingFluctuation(every, batch_size=cfg.eval_batch_size, run_dir=run_dir)]
    return pl.Trainer(
        default_root_dir=str(run_dir),
        max_epochs=t.max_epochs,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=t.precision,
        logger=loggers,
        callbacks=[checkpoint, *callbacks],
        enable_progress_bar=t.progress_bar,
        log_every_n_steps=t.log_every_n_steps,
        limit_train_batches=t.limit_train_batches,
        # None = no validation inside fit; the final trainer.validate() must still see every batch,
        # which limit_val_batches=0 would silently skip
        check_val_every_n_epoch=check_val_every_n_epoch or t.max_epochs + 1,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # our samplers shard by rank themselves
        deterministic=False,
        enable_model_summary=False,
    )
