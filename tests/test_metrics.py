"""The metrics writer: JSON lines and TensorBoard events, without loading PyTorch."""

import importlib.util
import subprocess
import sys

from subprocess_env import mmjax_env

CHILD = """
import os, sys
from mmjax.training.metrics import MetricsWriter, read_metrics
w = MetricsWriter(sys.argv[1])
w.write(3, {"loss": 2.5, "lr": 1e-3})
w.close()
assert read_metrics(sys.argv[1]) == [{"step": 3, "loss": 2.5, "lr": 1e-3}]
assert any(f.startswith("events") for f in os.listdir(os.path.join(sys.argv[1], "tensorboard")))
print("torch loaded:", "torch" in sys.modules)
if sys.argv[2] == "True":  # torch is installed
    import torch  # still importable afterwards
    print("torch imports:", torch.__name__)
"""


def test_writer_does_not_load_torch(tmp_path):
    # tensorboardX imports torch when it is installed, which cost every `mmjax train` 3 s at start-up.
    installed = importlib.util.find_spec("torch") is not None
    r = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), str(installed)],
                       env=mmjax_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "torch loaded: False" in r.stdout
    assert ("torch imports: torch" in r.stdout) == installed
