"""``run_pretrain(cfg)``: data -> checks -> Lightning fit -> final evaluation -> metrics.json -> eval/ (``evaluate=true``)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig

from ssroute.config import resolve_data_defaults, validate_pretrain
from ssroute.data import build_data
from ssroute.models import extra_metrics
from ssroute.train.pretrain_module import PretrainModule, check_pretrain_config, throughput
from ssroute.train.run import build_trainer, find_resume_dir, quiet_third_party_logs, resumed_config, save_config, write_json_atomic
from ssroute.train.schedule import resolve_stack

log = logging.getLogger(__name__)


def run_pretrain(cfg: DictConfig, run_dir: Path) -> Path:
    """Pretrain as ``cfg`` says and return the run folder (which may be a resumed one)."""
    quiet_third_party_logs()
    resume_dir = find_resume_dir(cfg.resume, run_dir.parent)
    if resume_dir is not None:
        cfg, run_dir = resumed_config(resume_dir, cfg), resume_dir
        log.info("resuming %s from checkpoints/last.ckpt", run_dir)
    validate_pretrain(cfg)
    data = build_data(cfg.data, cfg.seed)
    resolve_data_defaults(cfg, data.image_size)
    resolve_stack(cfg)
    check_pretrain_config(cfg, data)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    module = PretrainModule(cfg, data)
    trainer = build_trainer(cfg, run_dir, [], cfg.trainer.knn_every_n_epochs or None)
    if trainer.is_global_zero:
        save_config(cfg, run_dir)
        log.info("pretraining %s on %s (%d images, %dx%d, %d channel(s)) with patch size %d for %d epochs; run folder %s",
                 cfg.ssl.name, data.name, len(data.train), data.image_size, data.image_size, data.channels,
                 cfg.model.patch_size, cfg.trainer.max_epochs, run_dir)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    trainer.fit(module, ckpt_path=str(ckpt) if resume_dir is not None else None)
    trainer.save_checkpoint(str(ckpt))
    metrics: dict[str, float] = {"epochs": trainer.current_epoch, "steps": trainer.global_step}
    metrics.update(throughput(module))
    metrics.update(accounting(module))
    if data.labeled:
        module.final_eval = True
        trainer.validate(module, verbose=False)
        metrics.update(module.final_metrics)
        metrics.update(extra_metrics(module.backbone, training=False))  # backbone hook: depth/* of model=vit_depth over the final evaluation
    if trainer.is_global_zero:
        write_json_atomic(run_dir / "metrics.json", metrics)
        log.info("metrics: %s", metrics)
        if cfg.get("evaluate", True):  # configs saved before the flag existed evaluate too
            from ssroute.evaluate import evaluate_run

            evaluate_run(run_dir)
    return run_dir


def accounting(module: PretrainModule) -> dict[str, float]:
    """Parameters and FLOPs of the backbone, total and active per token, and the experts' shares."""
    from ssroute.layers.accounting import model_accounting

    return model_accounting(module.backbone, tokens_per_image=module.backbone.patch_embed.num_tokens)


__all__ = ["run_pretrain"]
