"""`mmjax eval` on a workdir from a tiny training run: per-step JSON with every metric, and the PNGs."""

import json
import os
import subprocess
import sys

import pytest
from subprocess_env import mmjax_env
from test_config import TINY

ROOT = os.path.dirname(os.path.dirname(__file__))
KEYS = {"zeroshot/top1", "zeroshot/top5", "retrieval/i2t/r1", "retrieval/i2t/r5", "retrieval/i2t/r10",
        "retrieval/t2i/r1", "retrieval/t2i/r5", "retrieval/t2i/r10", "linear_probe/top1"}


def _cli(*args, data_dir):
    env = mmjax_env(devices=1)
    cmd = [sys.executable, "-m", "mmjax", *args, "--config", TINY, f"--config.data.data_dir={data_dir}"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalcmd")
    w, d = root / "w", str(root / "tfds")
    r = _cli("train", "--workdir", str(w), "--quiet", data_dir=d)
    assert r.returncode == 0, r.stderr
    return w, d


def test_eval_all_writes_json_and_pngs(workdir):
    w, d = workdir
    before = sorted(os.listdir(w / "checkpoints"))
    r = _cli("eval", "--workdir", str(w), "--all", data_dir=d)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(w / "checkpoints")) == before  # read-only
    for step in (4, 8):
        with open(w / "eval" / f"{step}.json") as f:
            m = json.load(f)
        assert KEYS <= set(m) and m["step"] == step
        assert all(0.0 <= m[k] <= 1.0 for k in KEYS)
        for png in (f"confusion_{step}.png", f"retrieval_{step}.png"):
            assert os.path.getsize(w / "eval" / png) > 1000
    assert os.path.getsize(w / "eval" / "curves.png") > 1000
    assert "i2t/r1" in r.stdout and "lp/top1" in r.stdout  # the table


def test_eval_unknown_step_is_a_clear_error(workdir):
    w, d = workdir
    r = _cli("eval", "--workdir", str(w), "--step", "3", "--quiet", "--no-plots", data_dir=d)
    assert r.returncode == 2 and "no checkpoint at step 3" in r.stderr and "[4, 8]" in r.stderr
