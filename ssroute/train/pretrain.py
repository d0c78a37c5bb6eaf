"""``run_pretrain(cfg)``: data -> checks -> Lightning fit -> evaluation of the trained backbone -> metrics.json (and eval/)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig

from ssroute.checkpoint import last_checkpoint
from ssroute.config import resolve_data_defaults, validate_pretrain
from ssroute.data import build_data
from ssroute.eval.evaluation import RUN_PROTOCOLS
from ssroute.models.compile import compile_backbone
from ssroute.train.callbacks import OnlineMonitor, RoutingFluctuation
from ssroute.train.loggers import check_loggers
from ssroute.train.pretrain_module import PretrainModule, check_pretrain_config, throughput
from ssroute.train.run import build_trainer, finish_run, save_config, start_run
from ssroute.train.schedule import resolve_stack
from ssroute.train.threads import apply_threads

log = logging.getLogger(__name__)


def run_pretrain(cfg: DictConfig, run_dir: Path) -> Path:
    """Pretrain as ``cfg`` says and return the run folder (which may be a resumed one)."""
    cfg, run_dir, resume_from = start_run(cfg, run_dir)
    validate_pretrain(cfg)
    threads = apply_threads(cfg.trainer)
    check_loggers(cfg.trainer.get("loggers") or [])
    data = build_data(cfg.data, cfg.seed)
    resolve_data_defaults(cfg, data.image_size)
    resolve_stack(cfg)
    check_pretrain_config(cfg, data)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    module = PretrainModule(cfg, data)
    if cfg.trainer.get("compile"):
        log.info("torch.compile on %s", ", ".join(compile_backbone(module.backbone)))
    trainer = build_trainer(cfg, run_dir, [])
    if trainer.is_global_zero:
        save_config(cfg, run_dir)
        log.info(
            "pretraining %s on %s (%d images, %dx%d, %d channel(s)) with patch size %d for %d epochs; run folder %s",
            cfg.ssl.name,
            data.name,
            data.train_count,
            data.image_size,
            data.image_size,
            data.channels,
            cfg.model.patch_size,
            cfg.trainer.max_epochs,
            run_dir,
        )
    trainer.fit(module, ckpt_path=resume_from)
    trainer.save_checkpoint(str(last_checkpoint(run_dir)))
    metrics: dict[str, float] = {"epochs": trainer.current_epoch, "steps": trainer.global_step, **throughput(module), "threads": threads}
    if data.reader is not None:  # a lazily read image folder: files that failed to decode were skipped
        metrics["unreadable_images"] = data.reader.bad_count()
        if metrics["unreadable_images"]:
            log.warning("skipped %d unreadable image file(s): %s", metrics["unreadable_images"], ", ".join(data.reader.bad_files()[:5]))
    if data.stream is not None:  # data=webdataset: samples whose image did not decode were replaced
        metrics["unreadable_images"] = int(data.stream.bad)
    metrics["monitor_time_s"] = 0.0  # measuring while training: the online monitor and the routing snapshots
    for callback in trainer.callbacks:
        if isinstance(callback, RoutingFluctuation):
            metrics.update(callback.metrics())
        if isinstance(callback, (OnlineMonitor, RoutingFluctuation)):
            metrics["monitor_time_s"] = round(metrics["monitor_time_s"] + callback.time_s, 2)
    finish_run(cfg, run_dir, module, trainer, metrics, run_protocols=RUN_PROTOCOLS)
    return run_dir


__all__ = ["run_pretrain"]
