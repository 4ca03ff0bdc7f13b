"""Reduced soak test: SIGKILL the run 3 times (one aimed at a save), resume each time; the final
params are bit-identical to an uninterrupted run. `benchmarks/soak.py` is the full version."""

import os
import sys

import pytest
from test_config import TINY

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
import soak  # noqa: E402


@pytest.mark.slow
def test_three_sigkills_then_bit_identical(tmp_path):
    data_dir = tmp_path / "tfds"
    overrides = ["config.train.steps=40", "config.checkpoint.every_steps=3",
                 "config.train.log_every=1", f"config.data.data_dir={data_dir}"]
    # Seed 1 aims at least one of the three kills at a save in progress.
    stats = soak.run_with_kills(TINY, str(tmp_path / "killed"), overrides, kills=3, seed=1)
    assert stats["kills"] == 3 and stats["restarts"] == 4
    import subprocess
    subprocess.run(soak._command(TINY, str(tmp_path / "straight"), overrides), env=soak._env(),
                   cwd=soak.ROOT, check=True, capture_output=True)
    assert soak.params_identical(soak.final_params(str(tmp_path / "killed")),
                                 soak.final_params(str(tmp_path / "straight")))
