"""A real multi-process run on this machine: `launch/local.sh` starts 2 processes x 4 CPU devices
(jax.distributed, gloo). It must give the same losses as 1 process x 8 devices, and its checkpoint
must resume in a 1-process run."""

import os
import subprocess
import sys

import numpy as np
import pytest
from subprocess_env import mmjax_env
from test_config import TINY

from mmjax.training.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(__file__))


def _args(workdir, data_dir, *extra):
    return ["-m", "mmjax", "train", "--config", TINY, "--workdir", str(workdir), "--quiet",
            f"--config.data.data_dir={data_dir}", "--config.train.steps=6",
            "--config.mesh.data=-1", "--config.mesh.fsdp=2", *extra]


def _one_process(workdir, data_dir, *extra):
    env = mmjax_env(devices=8)
    r = subprocess.run([sys.executable, *_args(workdir, data_dir, *extra)], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


def _losses(workdir):
    return {m["step"]: m["loss"] for m in read_metrics(str(workdir)) if "loss" in m}


@pytest.mark.slow
def test_two_processes_match_one_and_resume_in_one(tmp_path):
    data_dir = tmp_path / "tfds"
    single, multi = tmp_path / "single", tmp_path / "multi"
    _one_process(single, data_dir)  # also builds the dataset once, before two processes read it
    env = mmjax_env(MMJAX_LOG_DIR=str(tmp_path / "logs"))  # local.sh sets each process's device count
    # Both processes compile for themselves: with the shared compilation cache one could finish minutes before
    # the other on a loaded machine and time out at the distributed shutdown barrier.
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    r = subprocess.run(["bash", "launch/local.sh", "2", "4", sys.executable,
                        *_args(multi, data_dir, "--stop-at-step=4")],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    # Both processes took part in checkpointing: each saved its data-iterator state.
    saved = sorted(f for f in os.listdir(multi / "checkpoints" / "4" / "data") if f.endswith(".json"))
    assert saved == ["process_0-of-2.json", "process_1-of-2.json"]
    a, b = _losses(single), _losses(multi)
    assert sorted(b) == [1, 2, 3, 4]
    np.testing.assert_allclose([b[s] for s in range(1, 5)], [a[s] for s in range(1, 5)],
                               atol=1e-5, rtol=0)
    # Only process 0 writes metrics: one line per step, not two.
    assert len(read_metrics(str(multi))) == 4
    # The 2-process checkpoint resumes in 1 process (8 devices) and continues the same run.
    _one_process(multi, data_dir)
    c = _losses(multi)
    np.testing.assert_allclose([c[5], c[6]], [a[5], a[6]], atol=1e-5, rtol=0)
