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


def test_curves_have_one_panel_per_evaluation_family_and_health_only_when_nonzero(tmp_path):
    from mmjax.eval import plots

    records = [{"step": s, "loss": 1.0 / s, "data/epoch": 0.0, "data/bad/bad_image": 0.0, "lr": 0.1}
               for s in range(1, 11)]
    records[4]["zeroshot/top1"] = 0.5
    records[9]["zeroshot/top1"] = 0.9
    evals = {10: {"retrieval/i2t/r1": 0.7, "retrieval/t2i/r1": 0.6, "caption/cider": 2.5, "linear_probe/l2": 1e-4}}
    panels = plots.curve_panels(records, evals)
    assert list(panels) == ["training loss", "caption", "retrieval", "zeroshot"]  # no health panel: all zero
    assert panels["zeroshot"] == {"zeroshot/top1": {5: 0.5, 10: 0.9}}  # at the evaluated steps only
    assert set(panels["retrieval"]) == {"retrieval/i2t/r1", "retrieval/t2i/r1"}
    records[7]["data/bad/bad_image"] = 3.0
    panels = plots.curve_panels(records, evals)
    assert panels["data health"] == {"data/bad/bad_image": {s: (3.0 if s == 8 else 0.0) for s in range(1, 11)}}
    out = plots.training_curves(records, evals, str(tmp_path / "curves.png"))
    assert (tmp_path / "curves.png").stat().st_size > 1000 and out.endswith("curves.png")
