"""The README's demo, run as written: the embedded digits CLIP reaches >= 0.90 zero-shot top-1."""

import os
import subprocess
import sys
import time

import pytest

from mmjax.training.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(__file__))


@pytest.mark.slow
def test_demo_reaches_090_zero_shot(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    env.pop("XLA_FLAGS", None)  # the demo runs as a user runs it: one CPU device
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "mmjax", "train", "--config", "configs/demo.py",
                        "--workdir", str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=1200)
    elapsed = time.perf_counter() - start
    assert r.returncode == 0, r.stderr[-3000:]
    top1 = [m["zeroshot/top1"] for m in read_metrics(str(tmp_path)) if "zeroshot/top1" in m]
    print(f"demo: zeroshot/top1 = {top1[-1]:.4f} in {elapsed:.0f} s")
    assert top1 and top1[-1] >= 0.90
    assert "zeroshot/top1" in r.stdout and "samples/s" in r.stdout and "ETA" in r.stdout
