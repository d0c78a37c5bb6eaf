"""``run_prune(cfg, run_dir, overrides)``: the pruning run, from a checkpoint to a smaller model in a run folder.

1. load the source (any ``model=vit`` run: pretrained, fine-tuned, upcycled,
   pruned) and, when it is a classifier (a fine-tuned head on labelled data),
   its head; the teacher is the source itself (``teacher=source``), another
   run, or none;
2. measure the source: ``test_top1`` (or kNN / linear probes when unlabelled),
   parameters and images/s;
3. train the masked student (:class:`~ssroute.prune.module.PruneModule`) with
   Lightning, resumable from ``checkpoints/last.ckpt``;
4. take the deterministic gates, remove the masked structures
   (:mod:`ssroute.prune.surgery`), check the smaller model against the masked
   one, measure it, and write ``checkpoints/last.ckpt`` (the pruned model in
   the form ``python -m finetune checkpoint=...`` reads, plus the gates and
   their ``log_alpha``), ``metrics.json``, ``report.md`` and ``plots/``.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from ssroute.checkpoint import check_data_fits, last_checkpoint, load_backbone_state, load_checkpoint, resolve_checkpoint, state_under
from ssroute.config import DataConfig, validate_prune
from ssroute.data import build_data
from ssroute.errors import ConfigError
from ssroute.eval.evaluation import held_out_images
from ssroute.io import save_atomic, write_json_atomic
from ssroute.models import build_backbone
from ssroute.prune.analytics import mask_analytics, write_sparsity_plot
from ssroute.prune.measure import images_per_second, paired_images_per_second, top1
from ssroute.prune.module import PruneModule, Teacher
from ssroute.prune.sparsity import expected_sparsity, sparsity
from ssroute.prune.surgery import prune_head, prune_state, pruned_config
from ssroute.train.run import build_trainer, save_config, start_run
from ssroute.upcycle.run import backbone_config

log = logging.getLogger(__name__)

PRUNE_SOURCES = "pass a run folder of python -m pretrain or finetune"  # what a foreign checkpoint's error suggests


def load_run(path: str, data) -> tuple[nn.Module, nn.Module | None, dict[str, Any], Path]:
    """(backbone, classification head or None, run config, checkpoint file) of a run, for ``data``."""
    file, checkpoint = load_checkpoint(path, PRUNE_SOURCES)
    config = checkpoint["hyper_parameters"]["config"]
    if config["model"].get("name", "vit") != "vit":
        raise ConfigError(
            f"checkpoint {file} is a model={config['model']['name']} run; structured pruning supports model=vit backbones only."
        )
    if config["model"].get("depth_layers"):
        raise ConfigError(
            f"checkpoint {file} has a pool routed over depth (model.depth_layers={config['model']['depth_layers']}); "
            "structured pruning supports transformer blocks only: prune a run without a depth stage."
        )
    backbone_state = state_under(checkpoint["state_dict"], "backbone.")
    cfg = backbone_config(config)
    check_data_fits(cfg.data.name, data, backbone_state, cfg.model.patch_size)
    backbone = build_backbone(cfg, data.image_size, data.channels)
    load_backbone_state(backbone, backbone_state, file)
    head_state = state_under(checkpoint["state_dict"], "head.")
    head = None
    if head_state and data.labeled:
        classes = head_state["1.weight"].shape[0]
        if classes != data.num_classes:
            raise ConfigError(
                f"checkpoint {file} classifies {classes} classes but data={data.name} has {data.num_classes}; prune on the data it was fine-tuned on."
            )
        head = nn.Sequential(nn.BatchNorm1d(backbone.dim, affine=False), nn.Linear(backbone.dim, classes))
        head.load_state_dict(head_state)
    return backbone.eval(), head, OmegaConf.to_container(cfg, resolve=True), file


def _data_config(cfg: DictConfig, source: dict[str, Any], overrides: list[str]) -> None:
    """The source's data section unless ``data=NAME`` is given; ``data.key=value`` overrides apply either way."""
    if any(o.lstrip("+").startswith(("data=", "data.name=")) for o in overrides):
        return
    given = [o.lstrip("+")[len("data.") :] for o in overrides if o.lstrip("+").startswith("data.")]
    merged = OmegaConf.merge(OmegaConf.structured(DataConfig), source["data"], OmegaConf.from_dotlist(given))
    with open_dict(cfg):
        cfg.data = merged


def _measure(backbone: nn.Module, head: nn.Module | None, data, normalize, cfg: DictConfig, prefix: str) -> dict[str, float]:
    images, labels = held_out_images(data, None)
    timed = normalize(images[: cfg.speed_images])
    out = {f"images_per_s{prefix}": round(images_per_second(backbone, head, timed), 1),
           f"params{prefix}": float(sum(p.numel() for p in backbone.parameters()))}  # fmt: skip
    if head is not None:
        out[f"test_top1{prefix}"] = top1(backbone, head, normalize(images), labels, cfg.eval_batch_size)
    return out


def _probes(backbone: nn.Module, data, cfg: DictConfig, prefix: str) -> dict[str, float]:
    from ssroute.eval.evaluation import evaluate_backbone

    if not data.labeled or data.test is None:
        return {}
    result = evaluate_backbone(backbone, data, cfg.data.augment, cfg.evaluation, protocols=["knn", "linear"])
    return {f"{k}{prefix}": v for k, v in result.metrics.items() if k in ("knn_top1", "linear_top1")}


def run_prune(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> Path:
    cfg, run_dir, resume_from = start_run(cfg, run_dir)
    validate_prune(cfg)
    if resume_from is None:
        with open_dict(cfg):
            cfg.checkpoint = str(resolve_checkpoint(cfg.checkpoint))
        source_config = load_checkpoint(cfg.checkpoint, PRUNE_SOURCES)[1]["hyper_parameters"]["config"]
        if "data" in source_config:
            _data_config(cfg, source_config, overrides)
    data = build_data(cfg.data, cfg.seed)
    if cfg.trainer.max_epochs is None:
        cfg.trainer.max_epochs = cfg.data.finetune_epochs
    source, head, source_config, source_file = load_run(cfg.checkpoint, data)
    teacher = None
    if cfg.distill != "none":
        t_backbone, t_head = (
            (copy.deepcopy(source), copy.deepcopy(head)) if cfg.teacher == "source" else load_run(str(cfg.teacher), data)[:2]
        )
        if head is not None and t_head is None:
            raise ConfigError(
                f"teacher={cfg.teacher} has no classification head for the labelled student; use a fine-tuned teacher run or teacher=source."
            )
        teacher = Teacher(t_backbone, t_head if head is not None else None)
    train_set = data.probe_train if head is not None else data.train
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    module = PruneModule(cfg, data, train_set, copy.deepcopy(source).train(), copy.deepcopy(head), teacher)
    before = {}
    trainer = build_trainer(cfg, run_dir, [], monitor=False)
    if trainer.is_global_zero and resume_from is None:
        before = _measure(source, head, data, module.augment.normalize, cfg, "_before")
        before.update({} if head is not None else _probes(source, data, cfg, "_before"))
        save_config(cfg, run_dir)
        write_json_atomic(run_dir / "before.json", before)
        log.info("pruning %s to sparsity %.2f (distill=%s); run folder %s", source_file, cfg.target_sparsity, cfg.distill, run_dir)
    elif (run_dir / "before.json").exists():
        import json

        before = json.loads((run_dir / "before.json").read_text())
    trainer.fit(module, ckpt_path=resume_from)
    if trainer.is_global_zero:
        finish_prune(cfg, run_dir, module, source_config, before)
    return run_dir


@torch.no_grad()
def finish_prune(
    cfg: DictConfig, run_dir: Path, module: PruneModule, source_config: dict[str, Any], before: dict[str, float]
) -> dict[str, Any]:
    """Remove the masked structures, check and measure the smaller model, write the checkpoint, metrics and report."""
    data, normalize = module.data, module.augment.normalize
    student, head = module.backbone.cpu().eval(), module.head.cpu().eval() if module.head is not None else None
    images, _ = held_out_images(data, 256)
    probe = normalize(images)
    metrics: dict[str, Any] = {"train_time_s": round(module.train_time_s, 2), "epochs": cfg.trainer.max_epochs,
                               "distill": module.distill, "target_sparsity": cfg.target_sparsity, "torch_threads": torch.get_num_threads()}  # fmt: skip
    new_config = dict(source_config)
    if module.masks is not None:
        masks = module.masks.eval()
        masks.draw()
        masked = student(probe)[0]
        masked_logits = head(masked) if head is not None else None
        z = {name: value.detach().cpu() for name, value in masks.z.items()}
        state, update = prune_state(student, masks.shape, z)
        new_config = pruned_config(source_config, update)
        head_state = prune_head(head, z, student.dim) if head is not None else None
        metrics["expected_sparsity"] = round(float(expected_sparsity(masks.shape, masks.keep_probabilities())), 6)
        metrics["sparsity"] = round(sparsity(masks.shape, {n: (v != 0).float() for n, v in z.items()}), 6)
        metrics["structures"] = list(masks.structures)
        metrics.update(mask_analytics(masks.shape, z))
        metrics.update(_masked_out_losses(module, probe, z))
        masks.detach_hooks()
    else:
        state, head_state, z = student.state_dict(), head.state_dict() if head is not None else None, {}
        masked, masked_logits = student(probe)[0], head(student(probe)[0]) if head is not None else None
        metrics["sparsity"] = metrics["expected_sparsity"] = 0.0
    new_config["prune"] = OmegaConf.to_container(cfg, resolve=True)
    pruned = build_backbone(backbone_config(new_config), data.image_size, data.channels)
    pruned.load_state_dict(state)
    pruned.eval()
    pruned_head = None
    if head_state is not None:
        pruned_head = nn.Sequential(nn.BatchNorm1d(pruned.dim, affine=False), nn.Linear(pruned.dim, data.num_classes)).eval()
        pruned_head.load_state_dict(head_state)
    features = pruned(probe)[0]
    reference = masked[:, z["hidden"] != 0] if "hidden" in z else masked
    metrics["surgery_max_abs_diff"] = float((features - reference).abs().max())
    if pruned_head is not None:
        metrics["surgery_max_abs_diff_logits"] = float((pruned_head(features) - masked_logits).abs().max())
    metrics.update(before)
    metrics.update(_measure(pruned, pruned_head, data, normalize, cfg, ""))
    metrics["params_after"] = metrics.pop("params")
    source, source_head, _, _ = load_run(str(cfg.checkpoint), data)  # timed in alternation with the pruned model: same load
    timed = normalize(held_out_images(data, cfg.speed_images)[0])
    speed = paired_images_per_second({"before": (source, source_head), "after": (pruned, pruned_head)}, timed)
    metrics["images_per_s_before"], metrics["images_per_s"] = round(speed["before"], 1), round(speed["after"], 1)
    if "test_top1" not in metrics:
        metrics.update(_probes(pruned, data, cfg, ""))
    if "images_per_s_before" in metrics:
        metrics["speedup"] = round(metrics["images_per_s"] / metrics["images_per_s_before"], 3)
    checkpoint = {
        "hyper_parameters": {"config": new_config},
        "state_dict": {**{f"backbone.{k}": v for k, v in state.items()}, **{f"head.{k}": v for k, v in (head_state or {}).items()}},
        "prune": {"gates": z, "log_alpha": {} if module.masks is None else {n: g.log_alpha.detach().cpu() for n, g in module.masks.gates.items()},
                  "source": str(cfg.checkpoint)},
    }  # fmt: skip
    save_atomic(checkpoint, last_checkpoint(run_dir))
    OmegaConf.save(OmegaConf.create(new_config), run_dir / "pruned_config.yaml")
    if cfg.evaluate:
        from ssroute.eval.evaluation import evaluate_backbone

        metrics.update(
            evaluate_backbone(
                pruned, data, cfg.data.augment, cfg.evaluation, out_dir=run_dir / "eval", run_config=new_config, run=str(run_dir)
            ).metrics
        )
    if module.masks is not None:
        write_sparsity_plot(metrics, len(pruned.blocks), run_dir / "plots" / "sparsity_per_block.png")
    (run_dir / "report.md").write_text(render_prune_report(metrics, new_config["model"]))
    write_json_atomic(run_dir / "metrics.json", metrics)
    log.info("pruned: sparsity %.3f, params %d -> %d, images/s %.0f -> %.0f", metrics["sparsity"], metrics["params_before"], metrics["params_after"],
             metrics["images_per_s_before"], metrics["images_per_s"])  # fmt: skip
    return metrics


def _masked_out_losses(module: PruneModule, probe: torch.Tensor, z: dict[str, torch.Tensor]) -> dict[str, float]:
    """The attention- and FFN-output losses (MSE) against the teacher, averaged over blocks whose attention / FFN
    was removed and over those kept (the notes' "check loss for masked out structures")."""
    if module.teacher is None:
        return {}
    from ssroute.prune.distill import sublayer_losses
    from ssroute.prune.taps import Taps

    taps = module.student_taps or Taps(module.backbone)
    module.teacher.to("cpu")
    module.backbone(probe)
    module.teacher(probe)
    teacher = module.teacher.taps
    out = {}
    for part, student_reps, teacher_reps in (("attn", taps.attn, teacher.attn), ("ffn", taps.ffn(), teacher.ffn())):
        if len(student_reps) != len(teacher_reps):
            continue
        losses = sublayer_losses(student_reps, teacher_reps)
        removed = (
            (z[part if part == "ffn" else "mha"] == 0)
            if (part if part == "ffn" else "mha") in z
            else torch.zeros(len(losses), dtype=torch.bool)
        )
        for name, chosen in (("removed", removed), ("kept", ~removed)):
            if chosen.any():
                out[f"distill_loss/{part}_{name}"] = round(float(losses[chosen].mean()), 6)
    return out


def render_prune_report(metrics: dict[str, Any], model_cfg: dict[str, Any]) -> str:
    """``report.md``: the headline numbers, the pruned widths, and the per-block sparsity."""
    keys = ["target_sparsity", "sparsity", "expected_sparsity", "params_before", "params_after", "test_top1_before", "test_top1",
            "knn_top1_before", "knn_top1", "linear_top1_before", "linear_top1", "images_per_s_before", "images_per_s", "speedup",
            "surgery_max_abs_diff", "distill", "train_time_s"]  # fmt: skip
    lines = ["# Pruning run", "", "| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {metrics[k]} |" for k in keys if k in metrics]
    shape = model_cfg.get("shape") or {}
    lines += ["", "## Pruned widths", "", f"- dim: {model_cfg.get('dim')}", f"- heads per block: {shape.get('heads') or 'unchanged'}",
              f"- FFN / expert hidden per block: {shape.get('ffn_hidden') or 'unchanged'}", f"- experts per block: {shape.get('experts') or 'unchanged'}"]  # fmt: skip
    rows = [k for k in metrics if k.startswith(("sparsity/", "kept/", "nonuniformity/", "ripley_l/", "distill_loss/"))]
    if rows:
        lines += ["", "## Where it pruned", "", "| metric | value |", "| --- | --- |"] + [f"| {k} | {metrics[k]} |" for k in rows]
        lines += ["", "![sparsity per block](plots/sparsity_per_block.png)"]
    return "\n".join(lines) + "\n"
