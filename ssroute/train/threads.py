"""Intra-op threads per training process (``trainer.threads``): the cores a process gets, not every core of the machine.

PyTorch sizes its intra-op pool to every core it sees. Two training processes
on one machine — a Hydra multirun with a parallel launcher, DDP on CPU, or two
people's runs — then each start that many threads, and the cores are
oversubscribed: on a 2-core CPU two such runs each slow down about 20x. So each
process takes ``cores / processes`` threads, where ``cores`` are the CPUs this
process may run on (its affinity mask: ``taskset`` and container limits count)
and ``processes`` are the training processes of this run on this machine — the
DDP processes per node (``trainer.devices``, on CPU) times the jobs a parallel
Hydra launcher runs at once (``hydra.launcher.n_jobs``). ``OMP_NUM_THREADS`` in
the environment, and ``trainer.threads`` above all, override the default.

>>> default_threads(cores=16, processes=4)
4
>>> default_threads(cores=2, processes=3)
1
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from omegaconf import ListConfig

from ssroute.errors import ConfigError

log = logging.getLogger(__name__)


def available_cores() -> int:
    """CPUs this process may run on (its affinity mask), falling back to every core of the machine."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def default_threads(cores: int, processes: int) -> int:
    """``cores // processes``, at least 1."""
    return max(1, cores // max(1, processes))


def local_processes(trainer_cfg: Any) -> int:
    """Training processes of this run on one machine: the DDP processes of a CPU run, else 1.

    A GPU process keeps one core busy feeding its device, so GPU runs count one
    process per device too when several devices share the node.
    """
    devices = trainer_cfg.get("devices", 1)
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    if isinstance(devices, int) and devices > 1:
        return devices
    if isinstance(devices, (list, tuple, ListConfig)):
        return max(1, len(devices))
    return 1  # devices=auto is one process on CPU


def parallel_jobs(cores: int) -> int:
    """Jobs a parallel Hydra launcher runs at once (joblib's ``n_jobs``; negative counts back from the cores); 1 otherwise."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
    except (ImportError, ValueError):  # not inside a Hydra app
        return 1
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return 1
    n_jobs = hydra_cfg.launcher.get("n_jobs")
    if not isinstance(n_jobs, int) or n_jobs == 0:
        return 1
    return max(1, n_jobs if n_jobs > 0 else cores + 1 + n_jobs)


def resolve_threads(trainer_cfg: Any, environ: dict[str, str] | None = None, cores: int | None = None, jobs: int | None = None) -> int:
    """The intra-op threads of this process: ``trainer.threads``, else ``OMP_NUM_THREADS``, else cores / processes."""
    requested = trainer_cfg.get("threads")
    if requested is not None:
        if not isinstance(requested, int) or requested < 1:
            raise ConfigError(f"trainer.threads={requested} must be a positive integer, or null for the cores divided by the processes.")
        return requested
    environ = os.environ if environ is None else environ
    omp = environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    cores = available_cores() if cores is None else cores
    jobs = parallel_jobs(cores) if jobs is None else jobs
    return default_threads(cores, local_processes(trainer_cfg) * jobs)


def apply_threads(trainer_cfg: Any) -> int:
    """Set this process's intra-op threads (and ``OMP_NUM_THREADS`` for the processes it starts); return the count."""
    threads = resolve_threads(trainer_cfg)
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # DDP children and Lightning's launcher keep the same size
    log.info("intra-op threads per process: %d", threads)
    return threads


__all__ = ["apply_threads", "available_cores", "default_threads", "resolve_threads"]
