"""Every failure a user can cause or meet ends as ONE `mmjax: error: ...` line naming what failed (the file, step or
key) and what to do, with exit code 2 (usage, config) or 1 (runtime: storage, data), and no traceback unless
`--debug` or MMJAX_DEBUG=1 (issue 22).

Failures met before anything is computed run in-process through `mmjax.cli.main` (its stderr captured); those met
while running (a full disk, a read-only workdir, bad data) run as real `python -m mmjax` processes, so that an
error of another thread or a traceback printed anywhere would show. A full disk is a tiny tmpfs (root, as in
tests/test_reliability.py; without root the metrics case writes to /dev/full and the others are skipped).
"""

import contextlib
import csv
import errno
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
from PIL import Image
from subprocess_env import mmjax_env
from test_config import TINY

from mmjax import cli
from mmjax import config as config_lib
from mmjax.commands import eval as eval_cmd
from mmjax.errors import MmjaxError
from mmjax.training.loop import train
from mmjax.training.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPEN_CLIP_CONFIG = {"embed_dim": 32, "quick_gelu": True,
                    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 16},
                    "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 64, "heads": 4, "layers": 2}}


def _can_mount() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("mount") is not None


@contextlib.contextmanager
def _tmpfs(path, size: str):
    """A tmpfs of `size` mounted at `path` (a full disk in miniature); unmounted at the end."""
    os.makedirs(path, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    """A workdir holding checkpoint 2 of the tiny config."""
    workdir = str(tmp_path_factory.mktemp("trained") / "w")
    config = config_lib.apply_overrides(config_lib.load_config_file(TINY), [
        f"config.data.data_dir={data_dir}", "config.train.steps=2", "config.checkpoint.every_steps=2"])
    train(config, workdir, verbose=False)
    return workdir


@dataclass
class Ctx:
    """What a case's setup gets: its own folder, the shared data_dir, and the trained workdir (made on demand)."""

    tmp: str
    data_dir: str
    trained: Callable[[], str]
    stack: contextlib.ExitStack
    after: list = field(default_factory=list)  # checks run after the command: f(stderr line)


def _train(ctx, *extra, workdir=None):
    return ["train", "--config", TINY, "--workdir", workdir or os.path.join(ctx.tmp, "w"), "--quiet",
            f"--config.data.data_dir={ctx.data_dir}", *extra]


def _config_file(ctx, name, text):
    path = os.path.join(ctx.tmp, name)
    with open(path, "w") as f:
        f.write(text)
    return path


# ------------------------------------------------------------------------------------- the cases' setups

def syntax_error(ctx):
    path = _config_file(ctx, "syntax.py", "from mmjax.config import base_config\ndef get_config(arg=None)\n"
                                          "    return base_config()\n")
    return ["train", "--config", path, "--workdir", os.path.join(ctx.tmp, "w")], [path, "line 2", "syntax error"]


def import_error(ctx):
    path = _config_file(ctx, "imports.py", "import no_such_module_for_mmjax_tests\nfrom mmjax.config import "
                                           "base_config\ndef get_config(arg=None):\n    return base_config()\n")
    return (["train", "--config", path, "--workdir", os.path.join(ctx.tmp, "w")],
            [path, "line 1", "no_such_module_for_mmjax_tests", "install"])


def missing_config(ctx):
    path = os.path.join(ctx.tmp, "nowhere.py")
    return ["train", "--config", path, "--workdir", os.path.join(ctx.tmp, "w")], [path, "does not exist"]


def unknown_key(ctx):
    return _train(ctx, "--config.train.stepz=3"), ["train.stepz", "did you mean 'train.steps'"]


def bad_override_type(ctx):
    return _train(ctx, "--config.train.batch_size=big"), ["train.batch_size", "expected an integer", "'big'"]


def log_every_zero(ctx):
    return _train(ctx, "--config.train.log_every=0"), ["train.log_every must be positive, got 0"]


def eval_every_negative(ctx):
    return _train(ctx, "--config.eval.every_steps=-5"), ["eval.every_steps must be >= 0", "-5"]


def checkpoint_every_zero(ctx):
    return _train(ctx, "--config.checkpoint.every_steps=0"), ["checkpoint.every_steps must be positive, got 0"]


def eval_not_a_workdir(ctx):
    folder = os.path.join(ctx.tmp, "not_a_run")
    os.makedirs(folder)
    return (["eval", "--config", TINY, "--workdir", folder, f"--config.data.data_dir={ctx.data_dir}"],
            [folder, "is not an mmjax workdir", "config.json"])


def eval_missing_step(ctx):
    workdir = ctx.trained()
    return (["eval", "--config", TINY, "--workdir", workdir, "--step", "7", "--quiet", "--no-plots",
             f"--config.data.data_dir={ctx.data_dir}"], ["no checkpoint at step 7", workdir, "available: [2]"])


def convert_missing_checkpoint(ctx):
    model_config = _config_file(ctx, "oc.json", json.dumps(OPEN_CLIP_CONFIG))
    missing, workdir = os.path.join(ctx.tmp, "weights.safetensors"), os.path.join(ctx.tmp, "converted")
    ctx.after.append(lambda line: not os.path.exists(workdir))  # nothing written
    return (["convert", "open_clip", "--model-config", model_config, "--checkpoint", missing, "--workdir", workdir,
             "--text-ids", "raw"], [missing, "does not exist", "--checkpoint"])


def bad_data(ctx):
    folder = os.path.join(ctx.tmp, "pairs")
    os.makedirs(folder)
    good = np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    Image.fromarray(good).save(os.path.join(folder, "good.png"))
    with open(os.path.join(folder, "broken.png"), "wb") as f:
        f.write(b"not an image")
    table = os.path.join(folder, "pairs.csv")
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "caption"])
        writer.writerows([["broken.png", f"a photo {i}"] for i in range(12)] +
                         [["good.png", f"a photo {i}"] for i in range(8)])
    spec = json.dumps({"name": "mostly_bad", "format": "csv", "paths": table})
    return (_train(ctx, "--config.data.name=spec", f"--config.data.spec={spec}"),
            [table, "3 bad samples in the first 3 of its 20", "max_bad_fraction", "fix or drop the file"])


def full_disk_metrics(ctx):
    """metrics.jsonl on a disk with room for a few records (or /dev/full without root)."""
    workdir = os.path.join(ctx.tmp, "w")
    os.makedirs(workdir)
    if _can_mount():
        disk = ctx.stack.enter_context(_tmpfs(os.path.join(ctx.tmp, "disk"), "4k"))
        os.symlink(os.path.join(disk, "metrics.jsonl"), os.path.join(workdir, "metrics.jsonl"))
    else:
        os.symlink("/dev/full", os.path.join(workdir, "metrics.jsonl"))
    ctx.after.append(lambda line: isinstance(read_metrics(workdir, log=lambda m: None), list))  # still readable
    return (_train(ctx, "--config.train.steps=40", "--config.checkpoint.every_steps=40"),
            [os.path.join(workdir, "metrics.jsonl"), "No space left on device", "free space"])


def full_disk_tensorboard(ctx):
    """W/tensorboard on a disk with one free page: the events file fills it after a few steps."""
    workdir = os.path.join(ctx.tmp, "w")
    os.makedirs(workdir)
    disk = ctx.stack.enter_context(_tmpfs(os.path.join(ctx.tmp, "disk"), "8k"))
    with open(os.path.join(disk, "filler"), "wb") as f:
        f.write(b"\0" * 4096)
    os.symlink(disk, os.path.join(workdir, "tensorboard"))
    return (_train(ctx, "--config.train.steps=40", "--config.checkpoint.every_steps=40"),
            [os.path.join(workdir, "tensorboard"), "events", "No space left on device", "free space"])


def fresh_workdir_full_disk(ctx):
    disk = ctx.stack.enter_context(_tmpfs(os.path.join(ctx.tmp, "disk"), "4k"))
    workdir = os.path.join(disk, "w")
    ctx.after.append(lambda line: not [n for n in os.listdir(workdir) if n.startswith("config.json")])
    return _train(ctx, workdir=workdir), [workdir, "No space left on device", "free space"]


def read_only_workdir(ctx):
    if _can_mount():
        disk = ctx.stack.enter_context(_tmpfs(os.path.join(ctx.tmp, "disk"), "64m"))
        workdir = os.path.join(disk, "w")
        shutil.copytree(ctx.trained(), workdir, symlinks=True)
        subprocess.run(["mount", "-o", "remount,ro", disk], check=True)
        reason = "Read-only file system"
    else:
        workdir = os.path.join(ctx.tmp, "w")
        shutil.copytree(ctx.trained(), workdir, symlinks=True)
        os.chmod(workdir, 0o555)
        ctx.stack.callback(os.chmod, workdir, 0o755)
        reason = "Permission denied"
    return _train(ctx, "--config.train.steps=4", workdir=workdir), [workdir, reason]


# (name, setup, exit code, where it runs, needs root to mount a tmpfs)
CASES = [
    ("config file with a syntax error", syntax_error, 2, "in-process", False),
    ("config file with an import error", import_error, 2, "in-process", False),
    ("missing --config file", missing_config, 2, "in-process", False),
    ("unknown config key", unknown_key, 2, "in-process", False),
    ("bad override type", bad_override_type, 2, "in-process", False),
    ("train.log_every=0", log_every_zero, 2, "in-process", False),
    ("eval.every_steps negative", eval_every_negative, 2, "in-process", False),
    ("checkpoint.every_steps=0", checkpoint_every_zero, 2, "in-process", False),
    ("eval on a folder that is not a workdir", eval_not_a_workdir, 2, "in-process", False),
    ("eval --step of a missing step", eval_missing_step, 2, "in-process", False),
    ("convert with a missing checkpoint file", convert_missing_checkpoint, 2, "in-process", False),
    ("too many bad samples (BadDataError)", bad_data, 1, "process", False),
    ("full disk while writing metrics", full_disk_metrics, 1, "process", False),
    ("full disk while writing TensorBoard", full_disk_tensorboard, 1, "process", True),
    ("fresh workdir on a full disk", fresh_workdir_full_disk, 1, "process", True),
    ("read-only workdir", read_only_workdir, 1, "process", False),
]


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("mmjax: error:")]
    assert len(lines) == 1, f"expected one `mmjax: error:` line:\n{stderr[-4000:]}"
    assert "Traceback" not in stderr, stderr[-4000:]
    return lines[0]


def _run_process(argv, **extra):
    env = mmjax_env(devices=1, **extra)
    if "MMJAX_DEBUG" not in extra:
        env.pop("MMJAX_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "mmjax", *argv], env=env, capture_output=True, text=True, cwd=ROOT,
                          timeout=600)


@pytest.mark.parametrize("name,setup,code,where,root", CASES, ids=[c[0] for c in CASES])
def test_failure_ends_as_one_error_line(name, setup, code, where, root, tmp_path, data_dir, request, capsys,
                                        monkeypatch):
    if root and not _can_mount():
        pytest.skip("needs root to mount a small tmpfs as a full disk")
    monkeypatch.delenv("MMJAX_DEBUG", raising=False)
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # the CLI adds its CPU defaults in-process
    with contextlib.ExitStack() as stack:
        ctx = Ctx(str(tmp_path), data_dir, lambda: request.getfixturevalue("trained"), stack)
        argv, needles = setup(ctx)
        if where == "in-process":
            capsys.readouterr()
            rc = cli.main(argv)
            stderr = capsys.readouterr().err
        else:
            r = _run_process(argv)
            rc, stderr = r.returncode, r.stderr
        line = _one_error_line(stderr)
        assert rc == code, f"exit code {rc}, expected {code}: {line}"
        for needle in needles:
            assert needle in line, f"{needle!r} not in {line!r}"
        for check in ctx.after:
            assert check(line), f"after-check failed: {line}"
        if where == "in-process":  # --debug shows the error itself, with its traceback
            with pytest.raises(MmjaxError):
                cli.main([*argv, "--debug"])


@pytest.mark.parametrize("how", ["--debug", "MMJAX_DEBUG=1"])
def test_debug_shows_the_traceback(how, tmp_path):
    path = tmp_path / "syntax.py"
    path.write_text("def get_config(arg=None)\n    pass\n")
    argv = ["train", "--config", str(path), "--workdir", str(tmp_path / "w")]
    r = _run_process([*argv, "--debug"]) if how == "--debug" else _run_process(argv, MMJAX_DEBUG="1")
    assert r.returncode == 1 and "Traceback (most recent call last)" in r.stderr, r.stderr[-3000:]
    assert "ConfigError" in r.stderr and "SyntaxError" in r.stderr and "mmjax: error:" not in r.stderr


def test_storage_error_met_anywhere_is_one_line(tmp_path, monkeypatch, capsys):
    """An OSError of the storage raised where mmjax does not wrap it still ends as one line, exit 1; any other
    OSError is a bug and keeps its traceback."""

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "w" / "eval"))

    monkeypatch.setattr(eval_cmd, "run", full)
    rc = cli.main(["eval", "--config", TINY, "--workdir", str(tmp_path / "w")])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 1 and str(tmp_path / "w" / "eval") in line and "free space" in line

    def bug(*args, **kwargs):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/mmjax/own/resource")

    monkeypatch.setattr(eval_cmd, "run", bug)
    with pytest.raises(FileNotFoundError):
        cli.main(["eval", "--config", TINY, "--workdir", str(tmp_path / "w")])


def test_ctrl_c_outside_training_is_one_line_exit_130(monkeypatch, capsys):
    """Ctrl-C while a command other than the training loop runs (evaluating, loading a config, preparing data):
    one line, exit code 130, no traceback (the training loop has its own clean stop: tests/test_signals.py)."""
    from mmjax import cli

    def interrupted(config, args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "eval", interrupted)
    assert cli.main(["eval", "--config", TINY, "--workdir", "/nonexistent"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mmjax: interrupted (Ctrl-C) during `mmjax eval`")
