"""``run_finetune(cfg)``: load a pretrained run, check it fits, fine-tune, write metrics.json.

The backbone's architecture comes from the checkpoint's own config; a ``model.*``
override that contradicts it is an error (not a silent reinterpretation of the
weights). The data defaults to the checkpoint's dataset; another dataset must
have the same image size and channels.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf, open_dict

from ssroute.checkpoint import check_data_fits, last_checkpoint, load_pretrained, resolve_checkpoint
from ssroute.config import resolve_data_defaults, validate_finetune
from ssroute.data import build_data, label_subset
from ssroute.errors import ConfigError
from ssroute.models.compile import compile_backbone
from ssroute.train.finetune_module import FinetuneModule
from ssroute.train.loggers import check_loggers
from ssroute.train.run import build_trainer, finish_run, save_config, start_run
from ssroute.train.schedule import resolve_stack_model
from ssroute.train.threads import apply_threads

log = logging.getLogger(__name__)


ARCHITECTURE = ("model", "router", "experts", "patches")  # sections that must match the weights (patches: the same selection)


def merge_model_config(cfg: DictConfig, pretrained: dict[str, Any], overrides: list[str]) -> None:
    """Take the checkpoint's architecture config; refuse overrides that contradict it."""
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        section, _, field = key.partition(".")
        if section in ARCHITECTURE and section in pretrained:
            saved = pretrained[section].get(field) if field else pretrained[section].get("name")
            requested = OmegaConf.select(cfg, key if field else f"{section}.name")
            if saved is not None and str(saved) != str(requested):
                raise ConfigError(
                    f"{key}={value} does not match the checkpoint, which was trained with {key}={saved}; drop the override or fine-tune from scratch."
                )
    with open_dict(cfg):
        for section in ARCHITECTURE:
            if section in pretrained:
                # typed sections (model, patches) merge into their schema; router/experts options replace the defaults whole
                typed = section in ("model", "patches")
                cfg[section] = OmegaConf.merge(cfg[section], pretrained[section]) if typed else OmegaConf.create(pretrained[section])


def run_finetune(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> Path:
    cfg, run_dir, resume_from = start_run(cfg, run_dir)
    validate_finetune(cfg)
    apply_threads(cfg.trainer)
    check_loggers(cfg.trainer.get("loggers") or [])
    backbone_state = None
    if cfg.checkpoint and resume_from is None:
        with open_dict(cfg):
            cfg.checkpoint = str(resolve_checkpoint(cfg.checkpoint))  # the run folder is recorded, not "latest"
        pretrained, backbone_state = load_pretrained(cfg.checkpoint)
        merge_model_config(cfg, pretrained, overrides)
        if not any(o.lstrip("+").startswith(("data=", "data.name=")) for o in overrides):
            with open_dict(cfg):
                cfg.data.name, cfg.data.root = pretrained["data"]["name"], pretrained["data"].get("root")
    elif cfg.checkpoint:
        _, backbone_state = load_pretrained(cfg.checkpoint)
    if not cfg.checkpoint:  # from scratch: a stack (model=ssl_route_ssl) builds the blocks pretraining would
        resolve_stack_model(cfg.model)
    data = build_data(cfg.data, cfg.seed)
    resolve_data_defaults(cfg, data.image_size, finetune=True)
    if not data.labeled:
        raise ConfigError(
            f"data {cfg.data.name} at {cfg.data.root} has no labels (no class subfolders); fine-tuning needs a labelled dataset, e.g. data=image_folder with one subfolder per class."
        )
    if backbone_state is not None:
        check_data_fits(cfg.data.name, data, backbone_state, cfg.model.patch_size)
    train_set = data.probe_train
    if cfg.labels_fraction < 1.0:
        train_set = train_set.subset(label_subset(train_set.labels, cfg.labels_fraction, cfg.seed))
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    try:
        module = FinetuneModule(cfg, data, train_set, backbone_state)
    except RuntimeError as err:  # load_state_dict: missing / unexpected / mis-shaped weights
        raise ConfigError(
            f"the checkpoint's weights do not fit the model built from its config ({str(err).splitlines()[0]}); the checkpoint is from an incompatible version."
        ) from None
    if cfg.trainer.get("compile"):
        log.info("torch.compile on %s", ", ".join(compile_backbone(module.backbone)))
    trainer = build_trainer(cfg, run_dir, [], monitor=False)
    if trainer.is_global_zero:
        save_config(cfg, run_dir)
        log.info("fine-tuning (%s) on %d labelled %s images; run folder %s", cfg.mode, len(train_set), data.name, run_dir)
    trainer.fit(module, ckpt_path=resume_from)
    trainer.save_checkpoint(str(last_checkpoint(run_dir)))
    trainer.validate(module, verbose=False)
    metrics = {
        "test_top1": module.test_top1,
        "labels_fraction": cfg.labels_fraction,
        "num_labels": len(train_set),
        "mode": cfg.mode,
        "pretrained": bool(cfg.checkpoint),
        "epochs": trainer.current_epoch,
        "train_time_s": round(module.train_time_s, 2),
    }
    finish_run(cfg, run_dir, module, trainer, metrics, run_protocols=("depth",))
    return run_dir
