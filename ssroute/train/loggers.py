"""Where a run logs: ``trainer.loggers=[csv, tensorboard, wandb, mlflow]``, Lightning's own logger classes.

Every logger receives what the training step and the callbacks log — the loss
terms by name (``loss/ssl``, ``loss/consistency``, ``loss/router_aux``, ...),
each routed block's expert load (``block{i}/load_e{j}``, one scalar per expert)
and dropped share, routing agreement and its chance level during training
(``monitor/routing_agreement``, ``monitor/routing_agreement_chance``) — and the
run config as hyperparameters. At the end of the run (:func:`log_final`) the
run's final metrics go to every logger but CSV as ``final/<key>`` (CSV's record
of them is ``metrics.json``) and the plots of ``<run>/eval/plots`` as images.

- ``csv``: ``<run>/logs/metrics.csv`` (the default);
- ``tensorboard``: ``<run>/logs/tensorboard/`` (``pip install -e ".[tensorboard]"``);
- ``wandb``: Weights & Biases, project ``trainer.log_project``, files under
  ``<run>/wandb/``; ``WANDB_MODE=offline`` keeps the run on disk for ``wandb sync``
  (``pip install -e ".[wandb]"``);
- ``mlflow``: MLflow, experiment ``trainer.log_project``, to ``MLFLOW_TRACKING_URI``
  or else the local file store ``./mlruns`` (``pip install -e ".[mlflow]"``); metric
  names use ``.`` for ``/`` there (``loss.ssl``: the file store keeps one file per
  metric, so ``loss`` and ``loss/ssl`` could not both exist).

A name that is not registered, or whose package is not installed, is refused
with one sentence before the run starts.

>>> LOGGERS.names()
['csv', 'tensorboard', 'wandb', 'mlflow']
>>> check_loggers(["csv", "comet"])
Traceback (most recent call last):
...
ssroute.errors.ConfigError: trainer.loggers=['csv', 'comet'] names an unknown logger 'comet'; choose from csv, tensorboard, wandb, mlflow.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ssroute.errors import ConfigError
from ssroute.registry import Registry


class LoggerChoice:
    """One ``trainer.loggers`` name: how to build its Lightning logger and send it an image."""

    lightning_class = ""  # the name of the Lightning logger class it builds
    package: str | None = None  # the module it needs, None = Lightning alone
    extra: str = ""  # the pip extra that installs it
    final_metrics = True  # receives the final metrics as final/<key>

    @staticmethod
    def build(run_dir: Path, trainer_cfg: Any):
        raise NotImplementedError

    @staticmethod
    def log_image(logger, key: str, path: Path, step: int) -> None:
        """Send the PNG at ``path`` under ``key``; loggers without images do nothing."""

    @staticmethod
    def close(logger) -> None:
        """Flush what the run logged after Lightning finalised the logger."""


LOGGERS: Registry[type[LoggerChoice]] = Registry("logger")


@LOGGERS.register("csv")
class CSV(LoggerChoice):
    lightning_class = "CSVLogger"
    final_metrics = False

    @staticmethod
    def build(run_dir: Path, trainer_cfg: Any):
        from pytorch_lightning.loggers import CSVLogger

        return CSVLogger(str(run_dir), name="logs", version="")


@LOGGERS.register("tensorboard")
class TensorBoard(LoggerChoice):
    lightning_class = "TensorBoardLogger"
    package, extra = "tensorboard", "tensorboard"

    @staticmethod
    def build(run_dir: Path, trainer_cfg: Any):
        from pytorch_lightning.loggers import TensorBoardLogger

        return TensorBoardLogger(str(run_dir), name="logs", version="tensorboard")

    @staticmethod
    def log_image(logger, key: str, path: Path, step: int) -> None:
        import numpy as np
        from PIL import Image

        logger.experiment.add_image(key, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")

    @staticmethod
    def close(logger) -> None:
        logger.experiment.flush()


@LOGGERS.register("wandb")
class WandB(LoggerChoice):
    lightning_class = "WandbLogger"
    package, extra = "wandb", "wandb"

    @staticmethod
    def build(run_dir: Path, trainer_cfg: Any):
        from pytorch_lightning.loggers import WandbLogger

        return WandbLogger(name=run_dir.name, save_dir=str(run_dir), project=trainer_cfg.get("log_project", "ssroute"), log_model=False)

    @staticmethod
    def log_image(logger, key: str, path: Path, step: int) -> None:
        logger.log_image(key=key, images=[str(path)], step=step)

    @staticmethod
    def close(logger) -> None:
        logger.experiment.finish()  # Lightning leaves the W&B run open; finishing writes it out (offline: to disk)


@LOGGERS.register("mlflow")
class MLflow(LoggerChoice):
    lightning_class = "DottedMLFlowLogger"
    package, extra = "mlflow", "mlflow"

    @staticmethod
    def build(run_dir: Path, trainer_cfg: Any):
        from pytorch_lightning.loggers import MLFlowLogger

        class DottedMLFlowLogger(MLFlowLogger):
            """MLflow's file store keeps a metric per file, so ``loss`` and ``loss/ssl`` cannot both exist: ``/`` becomes ``.``."""

            def log_metrics(self, metrics, step=None):
                super().log_metrics({key.replace("/", "."): value for key, value in metrics.items()}, step)

        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"file:{Path('mlruns').resolve()}"
        if uri.startswith("file:"):  # MLflow 3 keeps its local file store behind this opt-in; it is what works offline without a database
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        return DottedMLFlowLogger(experiment_name=trainer_cfg.get("log_project", "ssroute"), run_name=run_dir.name, tracking_uri=uri)

    @staticmethod
    def log_image(logger, key: str, path: Path, step: int) -> None:
        logger.experiment.log_artifact(logger.run_id, str(path), artifact_path=key.rpartition("/")[0] or None)


def check_loggers(names: Sequence[str]) -> list[type[LoggerChoice]]:
    """The logger choices of ``trainer.loggers``, or one sentence naming an unknown or uninstalled one."""
    names = list(names)
    choices = []
    for name in names:
        if name not in LOGGERS:
            raise ConfigError(f"trainer.loggers={names} names an unknown logger {name!r}; choose from {', '.join(LOGGERS.names())}.")
        choice = LOGGERS.get(name)
        if choice.package and importlib.util.find_spec(choice.package) is None:
            raise ConfigError(
                f'trainer.loggers includes {name} but the {choice.package} package is not installed; pip install -e ".[{choice.extra}]".'
            )
        choices.append(choice)
    return choices


def build_loggers(trainer_cfg: Any, run_dir: Path) -> list:
    """Lightning loggers for ``trainer_cfg.loggers`` (configs saved before the key existed: csv, and TensorBoard when installed)."""
    names = trainer_cfg.get("loggers")
    if names is None:
        names = ["csv"] + (["tensorboard"] if importlib.util.find_spec("tensorboard") else [])
    return [choice.build(run_dir, trainer_cfg) for choice in check_loggers(names)]


def log_final(loggers: Sequence, metrics: dict[str, Any], plots: Sequence[Path], step: int) -> None:
    """The run's final metrics (``final/<key>``) and plots (``plots/<name>``) to every logger that takes them, then flush."""
    numbers = {f"final/{k}": float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    for logger in loggers:
        choice = _choice_of(logger)
        if choice is None:
            continue
        if choice.final_metrics and numbers:
            logger.log_metrics(numbers, step=step)
        for plot in plots:
            choice.log_image(logger, f"plots/{Path(plot).stem}", Path(plot), step)
        logger.save()
        choice.close(logger)


def _choice_of(logger) -> type[LoggerChoice] | None:
    return next((LOGGERS.get(name) for name in LOGGERS if LOGGERS.get(name).lightning_class == type(logger).__name__), None)


__all__ = ["LOGGERS", "build_loggers", "check_loggers", "log_final"]
