"""trainer.threads: intra-op threads sized to the cores a process gets (ssroute/train/threads.py)."""

from __future__ import annotations

import pytest
import torch
from hydra.conf import HydraConf
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from ssroute.errors import ConfigError
from ssroute.train.threads import apply_threads, parallel_jobs, resolve_threads


def trainer(**values):
    return OmegaConf.create({"devices": 1, "accelerator": "cpu", "strategy": "auto", "threads": None, **values})


def test_explicit_threads_win_over_the_environment_and_the_cores():
    assert resolve_threads(trainer(threads=3), environ={"OMP_NUM_THREADS": "1"}, cores=16, jobs=4) == 3


def test_omp_num_threads_wins_over_the_default():
    assert resolve_threads(trainer(), environ={"OMP_NUM_THREADS": "5"}, cores=16, jobs=1) == 5


@pytest.mark.parametrize(
    ("devices", "jobs", "cores", "expected"),
    [(1, 1, 16, 16), (2, 1, 16, 8), ("4", 1, 16, 4), ([0, 1], 2, 16, 4), (1, 3, 2, 1), (2, 2, 2, 1)],
)
def test_default_is_cores_over_processes(devices, jobs, cores, expected):
    # DDP processes per node times parallel sweep jobs share the cores; never below one thread
    assert resolve_threads(trainer(devices=devices), environ={}, cores=cores, jobs=jobs) == expected


def test_configs_saved_before_the_key_existed_get_the_default():
    old = OmegaConf.create({"devices": 2, "accelerator": "cpu"})
    OmegaConf.set_struct(old, True)
    assert resolve_threads(old, environ={}, cores=8, jobs=1) == 4


@pytest.mark.parametrize("bad", [0, -2, "many"])
def test_a_bad_thread_count_is_one_clear_error(bad):
    with pytest.raises(ConfigError, match="trainer.threads"):
        resolve_threads(trainer(threads=bad), environ={}, cores=2, jobs=1)


def test_apply_threads_sets_the_intra_op_pool(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    try:
        assert apply_threads(trainer(threads=2)) == 2
        assert torch.get_num_threads() == 2
        import os

        assert os.environ["OMP_NUM_THREADS"] == "2"  # processes it starts (DDP) get the same size
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(("n_jobs", "expected"), [(2, 2), (-1, 8), (-3, 6), (None, 1)])
def test_a_parallel_hydra_launcher_counts_its_jobs(n_jobs, expected):
    launcher = {"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"}
    if n_jobs is not None:
        launcher["n_jobs"] = n_jobs
    hydra = OmegaConf.structured(HydraConf)
    hydra.mode, hydra.launcher = RunMode.MULTIRUN, launcher
    HydraConfig.instance().set_config(OmegaConf.create({"hydra": hydra}))
    try:
        assert parallel_jobs(cores=8) == expected
    finally:
        HydraConfig.instance().cfg = None
    assert parallel_jobs(cores=8) == 1  # outside a Hydra app: one process
