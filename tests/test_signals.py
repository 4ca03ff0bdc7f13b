"""Ctrl-C like SIGTERM: the first SIGINT finishes the step, checkpoints and exits 0, and the run resumes
bit-identically; a second SIGINT aborts at once (exit 130) and the workdir still resumes; SIGTERM or SIGINT while
the run starts exits 0 with a message and no traceback."""

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from subprocess_env import mmjax_env
from test_config import TINY

import mmjax
from mmjax.training.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(__file__))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


class _Run:
    """`mmjax train` on the tiny config in a subprocess, its output read line by line as it comes."""

    def __init__(self, workdir, data_dir, *flags, env=None):
        cmd = [sys.executable, "-m", "mmjax", "train", "--config", TINY, "--workdir", str(workdir),
               f"--config.data.data_dir={data_dir}", "--config.train.steps=100000", *flags]
        self.proc = subprocess.Popen(cmd, env=env or mmjax_env(), cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, pattern: str, timeout: float = 300) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                continue
            if line is None:
                break
            self.seen.append(line)
            if re.search(pattern, line):
                return line
        raise AssertionError(f"no line matching {pattern!r}; output:\n{''.join(self.seen)}")

    def finish(self, timeout: float = 300) -> tuple[int, str]:
        self.proc.wait(timeout=timeout)
        while (line := self.lines.get(timeout=10)) is not None:
            self.seen.append(line)
        return self.proc.returncode, "".join(self.seen)


def _train(workdir, data_dir, *flags) -> str:
    code, out = _Run(workdir, data_dir, *flags).finish()
    assert code == 0, out
    return out


def _params(workdir):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(mmjax.load(str(workdir)).encoder.params))]


def _steps(workdir) -> list[int]:
    """The complete checkpoints: Orbax renames a save's temporary folder to its step once it is whole."""
    folder = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) else []


def test_sigint_checkpoints_the_step_exits_0_and_resumes_bit_identically(tmp_path, data_dir):
    once = "--config.checkpoint.every_steps=100000"
    run = _Run(tmp_path / "a", data_dir, once)
    deadline = time.time() + 300
    while time.time() < deadline and len(read_metrics(str(tmp_path / "a"))) < 3:
        time.sleep(0.2)
    run.proc.send_signal(signal.SIGINT)
    code, out = run.finish()
    assert code == 0, out
    assert "SIGINT received: finishing this step" in out and "Traceback" not in out
    (stopped,) = _steps(tmp_path / "a")
    assert f"mmjax: interrupted: stopped after step {stopped}/100000" in out
    assert stopped >= 3
    # Resumed two steps further, against the same steps run without a break (both at once): bit-identical.
    runs = [_Run(tmp_path / w, data_dir, once, f"--stop-at-step={stopped + 2}") for w in "ab"]
    (code, out), (code_b, out_b) = (r.finish() for r in runs)
    assert code == 0 and code_b == 0, out + out_b
    assert f"resumed from {tmp_path / 'a' / 'checkpoints'}/{stopped}" in out
    assert _steps(tmp_path / "a")[-1] == _steps(tmp_path / "b")[-1] == stopped + 2
    for x, y in zip(_params(tmp_path / "a"), _params(tmp_path / "b"), strict=True):
        assert x.tobytes() == y.tobytes()


def test_second_sigint_aborts_at_once_and_the_workdir_resumes(tmp_path, data_dir):
    run = _Run(tmp_path, data_dir, "--config.checkpoint.every_steps=2")
    deadline = time.time() + 300
    while time.time() < deadline and len(read_metrics(str(tmp_path))) < 5:
        time.sleep(0.2)
    run.proc.send_signal(signal.SIGINT)
    run.wait_for("SIGINT received")
    run.proc.send_signal(signal.SIGINT)  # while the step finishes or its checkpoint is being saved
    code, out = run.finish(timeout=60)
    assert code == 130, out
    assert "Traceback" not in out
    message = re.search(r"mmjax: second interrupt: aborting now.*checkpoint (\d+) \(.*\) is the newest complete "
                        r"one", out)
    assert message, out
    complete = _steps(tmp_path)
    assert int(message.group(1)) >= 2 and int(message.group(1)) in complete  # (a save may complete as it exits)
    # No partial checkpoint is visible as a step: the run resumes from the newest complete one.
    out = _train(tmp_path, data_dir, f"--stop-at-step={complete[-1] + 1}")
    assert f"resumed from {tmp_path / 'checkpoints'}/{complete[-1]}\n" in out


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_while_starting_exits_0_with_a_message(tmp_path, signum):
    # A fresh data folder: the run prepares the digits data set after printing its mesh line, before its first step.
    run = _Run(tmp_path / "w", tmp_path / "tfds")
    run.wait_for(r"^mmjax: mesh ")
    run.proc.send_signal(signum)
    code, out = run.finish()
    assert code == 0, out
    assert "Traceback" not in out
    assert re.search(r"mmjax: (preempted|interrupted): stopped before step 1/100000, while starting: nothing to "
                     r"save; nothing was trained yet", out), out
    assert not _steps(tmp_path / "w")


@pytest.mark.slow
def test_second_sigint_aborts_both_processes_of_a_two_process_run(tmp_path, data_dir):
    # Ctrl-C in the terminal of `launch/local.sh` reaches every process of the run; the second one must end them
    # all at once, including one that waits in a collective for a peer that is already gone.
    _train(tmp_path / "prepare", data_dir, "--stop-at-step=1")  # the data set, built once before two readers
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mesh = ("--config.mesh.data=-1", "--config.mesh.fsdp=2", "--config.checkpoint.every_steps=2")
    envs = [dict(mmjax_env(devices=4), MMJAX_COORDINATOR=f"127.0.0.1:{port}", MMJAX_NUM_PROCESSES="2",
                 MMJAX_PROCESS_ID=str(i)) for i in range(2)]
    for env in envs:
        env.pop("JAX_COMPILATION_CACHE_DIR", None)  # each compiles for itself, as in test_multiprocess
    runs = [_Run(tmp_path / "w", data_dir, *mesh, env=env) for env in envs]
    deadline = time.time() + 400
    while time.time() < deadline and len(read_metrics(str(tmp_path / "w"))) < 5:
        assert all(r.proc.poll() is None for r in runs), [r.finish(timeout=30)[1][-3000:] for r in runs]
        time.sleep(0.2)
    for r in runs:
        r.proc.send_signal(signal.SIGINT)
    runs[0].wait_for("SIGINT received")  # process 0 speaks for the run
    time.sleep(1)  # a second Ctrl-C comes later than the first: one signal each, not two coalesced into one
    for r in runs:
        r.proc.send_signal(signal.SIGINT)
    (code, out), (code_1, out_1) = (r.finish(timeout=60) for r in runs)
    assert code == code_1 == 130, out[-3000:] + out_1[-3000:]
    assert "mmjax: second interrupt: aborting now" in out
    assert "Traceback" not in out + out_1
    complete = _steps(tmp_path / "w")
    assert complete and complete[-1] >= 2
    # One process (8 devices) resumes the workdir from its newest complete checkpoint.
    code, out = _Run(tmp_path / "w", data_dir, *mesh, f"--stop-at-step={complete[-1] + 1}",
                     env=mmjax_env(devices=8)).finish()
    assert code == 0, out[-3000:]
    assert f"resumed from {tmp_path / 'w' / 'checkpoints'}/{complete[-1]}\n" in out
