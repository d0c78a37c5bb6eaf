"""What the training entry points (pretraining, fine-tuning, pruning) share: run folders, resuming, the Trainer, metrics.json.

Every run is a folder (Hydra's output dir): the resolved ``config.yaml``,
``checkpoints/`` (``last.ckpt`` every N steps and at the end; Lightning writes
them through an fsspec transaction, so a kill never leaves a half-written file),
``logs/`` (``trainer.loggers``: CSV by default; TensorBoard, W&B, MLflow) and ``metrics.json`` (flat keys,
written atomically). A run without ``metrics.json`` is unfinished and can be
resumed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from ssroute.checkpoint import last_checkpoint
from ssroute.errors import ConfigError
from ssroute.io import write_json_atomic

log = logging.getLogger(__name__)


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def quiet_third_party_logs() -> None:
    """Hide Lightning's product tip; keep everything else."""
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_DropAdverts())


def start_run(cfg: DictConfig, run_dir: Path) -> tuple[DictConfig, Path, str | None]:
    """(config, run folder, checkpoint to resume from) of a pretraining, fine-tuning or pruning run about to start.

    A fresh run keeps ``cfg`` and ``run_dir`` and resumes from nothing (None).
    With ``resume=true`` or ``resume=PATH`` (:func:`find_resume_dir`) it is the
    resumed run's own folder and saved config, and its ``checkpoints/last.ckpt``
    for ``trainer.fit(module, ckpt_path=...)``.
    """
    quiet_third_party_logs()
    resume_dir = find_resume_dir(cfg.resume, run_dir.parent)
    if resume_dir is None:
        return cfg, run_dir, None
    log.info("resuming %s from checkpoints/last.ckpt", resume_dir)
    return resumed_config(resume_dir, cfg), resume_dir, str(last_checkpoint(resume_dir))


def find_resume_dir(resume: Any, runs_root: Path) -> Path | None:
    """The run folder to resume: None (fresh run), a given path, or the newest unfinished run."""
    if resume in (False, None, "false", "False", ""):
        return None
    if resume in (True, "true", "True"):
        candidates = [p.parent.parent for p in runs_root.glob("*/checkpoints/last.ckpt") if not (p.parent.parent / "metrics.json").exists()]
        if not candidates:
            raise ConfigError(
                f"resume=true found no unfinished run with checkpoints/last.ckpt under {runs_root}; pass resume=RUN_FOLDER instead."
            )
        return max(candidates, key=lambda p: last_checkpoint(p).stat().st_mtime)
    path = Path(str(resume))
    if not last_checkpoint(path).exists():
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


def build_trainer(cfg: DictConfig, run_dir: Path, callbacks: list[pl.Callback], monitor: bool = True) -> pl.Trainer:
    """A Lightning Trainer for ``cfg.trainer`` writing into ``run_dir``.

    Loggers are ``trainer.loggers`` (:mod:`ssroute.train.loggers`).
    MoE models get :class:`~ssroute.train.callbacks.RoutingFluctuation` (every
    ``trainer.fluctuation_every_n_steps`` steps; 0 = off); with ``monitor`` every
    model gets :class:`~ssroute.train.callbacks.OnlineMonitor` (every
    ``trainer.knn_every_n_epochs`` epochs; null = about ten times a run; 0 = off).
    """
    from pytorch_lightning.callbacks import ModelCheckpoint

    from ssroute.train.callbacks import OnlineMonitor, RoutingFluctuation, monitor_every
    from ssroute.train.loggers import build_loggers

    loggers = build_loggers(cfg.trainer, run_dir)
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
    every_epochs = monitor_every(t.knn_every_n_epochs, t.max_epochs)
    if monitor and every_epochs:
        callbacks = [*callbacks, OnlineMonitor(every_epochs, batch_size=cfg.eval_batch_size)]
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
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # our samplers shard by rank themselves
        deterministic=False,
        enable_model_summary=False,
    )


def finish_run(
    cfg: DictConfig,
    run_dir: Path,
    module: pl.LightningModule,
    trainer: pl.Trainer,
    metrics: dict[str, Any],
    run_protocols: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The end of a pretraining or fine-tuning run, on rank 0: evaluate the trained backbone, write ``metrics.json``.

    The evaluation is ``ssroute.eval.evaluation.evaluate_backbone``, the code of
    ``python -m ssroute.evaluate``: with ``evaluate=true`` every protocol, into
    ``<run>/eval/`` (metrics, plots, report); with ``evaluate=false`` only
    ``run_protocols`` (pretraining: :data:`~ssroute.eval.evaluation.RUN_PROTOCOLS`). Its metrics,
    with ``metrics`` (what the run itself measured: time, throughput, accounting,
    fluctuation), form the run's ``metrics.json``.
    """
    import torch
    from pytorch_lightning.accelerators import CUDAAccelerator

    from ssroute.config import EvalSettings
    from ssroute.eval.evaluation import evaluate_backbone, held_out_images
    from ssroute.moe import model_accounting
    from ssroute.train.loggers import log_final

    if not trainer.is_global_zero:
        return metrics
    full = bool(cfg.get("evaluate", True))  # configs saved before the flag existed evaluate too
    data, backbone = module.data, module.backbone
    backbone.to("cuda" if isinstance(trainer.accelerator, CUDAAccelerator) else "cpu")
    result = evaluate_backbone(
        backbone, data, cfg.data.augment, cfg.get("evaluation") or OmegaConf.structured(EvalSettings),  # configs saved before the section existed
        protocols=None if full else supported(run_protocols, data, backbone),
        out_dir=run_dir / "eval" if full else None, run_config=OmegaConf.to_container(cfg, resolve=True), run=str(run_dir), data_name=cfg.data.name,
    )  # fmt: skip
    images, _ = held_out_images(data, 256)  # one forward tells the measured k of data-dependent routers
    with torch.no_grad():
        _, aux = backbone.eval()(module.augment.normalize(images.to(next(backbone.parameters()).device)))
    merged = {**metrics, **model_accounting(backbone, backbone.patch_embed.num_tokens, aux.rows_per_token()), **result.metrics}
    write_json_atomic(run_dir / "metrics.json", merged)
    log.info("metrics: %s", {k: v for k, v in merged.items() if "/" not in k})
    log_final(trainer.loggers, merged, sorted((run_dir / "eval" / "plots").glob("*.png")) if full else [], trainer.global_step)
    if full:
        log.info("evaluation written to %s", result.out_dir)
    return merged


def supported(protocols, data, backbone) -> list[str]:
    """Of ``protocols``, those the data (labels) and the model (routing, routing over depth) support."""
    from ssroute.eval.evaluation import LABELLED, ROUTING
    from ssroute.models.depth_router import depth_stack
    from ssroute.moe import moe_layers

    labelled, routed, depth = data.labeled and data.test is not None, bool(moe_layers(backbone)), depth_stack(backbone) is not None
    return [p for p in protocols if (p not in LABELLED or labelled) and (p not in ROUTING or routed) and (p != "depth" or depth)]
