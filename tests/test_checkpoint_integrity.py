"""Verified checkpoints: checksums written with every save and checked at every restore; damage of any kind is
set aside with a message (resume) or refused with a clear error (an explicit step), never loaded; a non-finite
state is never saved; keep-N never deletes a good checkpoint. A reduced set of `benchmarks/fault_injection.py`'s
cases (the full run: `python benchmarks/fault_injection.py --cases 60`)."""

import json
import os
import random
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from subprocess_env import mmjax_env

import mmjax
from mmjax.cli import main
from mmjax.training import integrity
from mmjax.training.checkpoint import CheckpointDamagedError, Checkpointer, CheckpointWriteError, NonFiniteStateError
from mmjax.training.health import NonFiniteError
from mmjax.training.loop import train

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "benchmarks"))
import fault_injection as fi  # noqa: E402

LEGACY = os.path.join(HERE, "fixtures", "legacy_workdir_v0")

# Every kind of saved leaf, the data-iterator state, the checksum record and the metadata files, once; damage in
# two checkpoints at once, and in all of them.
CI_CASES = [fi.Case(0, kind, "value") for kind in fi.LEAF_KINDS] + [
    fi.Case(0, "opt_state.nu", "chunk-bytes"),
    fi.Case(0, "data", "json-edit"),
    fi.Case(0, "data", "truncate"),
    fi.Case(0, "config", "flip"),
    fi.Case(0, "integrity", "json-edit"),
    fi.Case(0, "_CHECKPOINT_METADATA", "delete"),
    fi.Case(0, "state/_METADATA", "truncate"),
    fi.Case(0, "state/manifest.ocdbt", "delete"),
    fi.Case(0, "state/d (b-tree node)", "flip"),
    fi.Case(0, "params", "chunk-bytes", "two-newest"),
    fi.Case(0, "state/manifest.ocdbt", "truncate", "all"),
]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """The tiny config trained 6 steps: checkpoints 2, 4, 6, and what each holds."""
    base = tmp_path_factory.mktemp("pristine")
    fi.train_pristine(str(base / "w"), str(base / "tfds"))
    return fi.load_pristine(str(base / "w"))


@pytest.fixture
def workdir(pristine, tmp_path):
    w = tmp_path / "w"
    shutil.copytree(pristine.workdir, w)
    return w


def test_every_saved_leaf_has_a_checksum(pristine):
    ck = os.path.join(pristine.workdir, "checkpoints")
    meta = json.load(open(os.path.join(ck, "6", "_CHECKPOINT_METADATA")))
    record = json.load(open(os.path.join(ck, "6", "integrity", "metadata")))
    assert meta["custom_metadata"]["mmjax_integrity"]["sha256"] == integrity.digest(record)
    assert set(record["leaves"]) == set(integrity.leaf_paths(pristine.factory.abstract))
    kinds = {k for k, pattern in fi.LEAF_KINDS.items() for p in record["leaves"] if re.search(pattern, p)}
    assert kinds == set(fi.LEAF_KINDS)
    assert record["step"] == 6 and record["config_sha256"]
    assert set(record["data_sha256"]) == {"process_0-of-1.json"}


def test_checksums_do_not_depend_on_the_sharding():
    x = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("a", "b"))
    sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("a", "b")))
    a, b = integrity.summarize({"x": sharded}), integrity.summarize({"x": jnp.asarray(x)})
    assert a == b
    y = x.copy()
    y[[0, 1]] = y[[1, 0]]  # two rows swapped: the plain sum is the same, the weighted one is not
    c = integrity.summarize({"x": jnp.asarray(y)})
    assert c["x"]["sum"] == a["x"]["sum"] and c["x"]["wsum"] != a["x"]["wsum"]


@pytest.mark.parametrize("case", CI_CASES, ids=lambda c: c.label().replace(" ", "-"))
def test_damaged_checkpoint_is_never_loaded(case, pristine, tmp_path):
    r = fi.run_case(case, pristine, str(tmp_path), seed=0)
    detail = f"{r['damage']} -> {r['messages']}"
    expected = "clear-error" if case.scope == "all" else "fallback-with-message"
    assert r["outcome"] == expected, detail
    assert r["explicit"] == "clear-error", detail
    assert r["restored"] == (None if case.scope == "all" else fi.STEPS[-len(case.steps()) - 1])
    assert not r["deleted"], detail


def test_eval_and_load_refuse_a_damaged_step(workdir, capsys):
    ck = str(workdir / "checkpoints")
    fi.damage(ck, 6, fi.Case(0, "opt_state.nu", "value"), random.Random(1))
    with pytest.raises(CheckpointDamagedError, match=r"checkpoints/6 failed verification.*opt_state/1/nu/"):
        mmjax.load(str(workdir), step=6)
    capsys.readouterr()
    model = mmjax.load(str(workdir))  # no step: the newest that verifies, saying so
    assert model.step == 4
    out = capsys.readouterr().out
    assert "checkpoint 6 failed verification" in out and "left in place (read-only)" in out
    assert sorted(os.listdir(ck)) == ["2", "4", "6"]  # read-only: nothing moved
    code = main(["eval", "--config", fi.TINY, "--workdir", str(workdir), "--step", "6", "--quiet", "--no-plots"])
    err = capsys.readouterr().err
    assert code == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mmjax: error: checkpoint ") and "6 failed verification" in err
    assert not os.path.exists(workdir / "eval" / "6.json")
    # Without --step, mmjax eval evaluates the newest checkpoint that verifies, saying which one failed.
    code = main(["eval", "--config", fi.TINY, "--workdir", str(workdir), "--no-plots"])
    out = capsys.readouterr().out
    assert code == 0 and "checkpoint 6 failed verification" in out and "evaluating checkpoint 4" in out
    assert sorted(os.listdir(workdir / "eval")) == ["4.json"]


def test_training_resumes_from_the_last_verified_checkpoint(workdir, pristine, capsys):
    ck = str(workdir / "checkpoints")
    fi.damage(ck, 6, fi.Case(0, "params", "value"), random.Random(2))
    data_dir = json.load(open(workdir / "config.json"))["data"]["data_dir"]
    code = main(["train", "--config", fi.TINY, "--workdir", str(workdir), "--quiet", "--config.train.steps=6",
                 "--config.checkpoint.every_steps=2", "--config.checkpoint.keep=3", "--config.train.log_every=2",
                 f"--config.data.data_dir={data_dir}"])
    out = capsys.readouterr().out
    assert code == 0
    assert "checkpoint 6 failed verification: 1 array(s) do not match their checksums: params/" in out
    assert sorted(os.listdir(ck), key=int) == ["2", "4", "6"]  # 6 trained again from 4
    assert os.listdir(ck + ".damaged") == ["6"]
    resumed = fi.load_pristine(str(workdir))  # restores (and so verifies) 2, 4 and the new 6
    for step in (2, 4, 6):  # the new 6 equals the pristine one: same data, same steps
        assert fi._identical(resumed.states[step], pristine.states[step]), step


def _with_nan_in_nu(state):
    """`state` with one value of the first Adam `nu` leaf set to NaN."""
    adam = state.opt_state[1]
    leaves, tree = jax.tree.flatten(adam.nu)
    leaves[0] = jnp.asarray(np.asarray(leaves[0]).copy().reshape(-1)).at[0].set(jnp.nan).reshape(leaves[0].shape)
    nu = jax.tree.unflatten(tree, leaves)
    return state.replace(opt_state=(state.opt_state[0], adam._replace(nu=nu), *state.opt_state[2:]))


def test_save_refuses_a_nonfinite_state(workdir, pristine):
    ck = str(workdir / "checkpoints")
    poisoned = _with_nan_in_nu(pristine.states[6])
    ckpt = Checkpointer(ck, keep=1, async_save=False)
    with pytest.raises(NonFiniteStateError, match=r"not saving checkpoint 8: .*NaN or Inf.*opt_state/1/nu/"):
        ckpt.save(8, poisoned, force=True)
    ckpt.close()
    assert sorted(os.listdir(ck), key=int) == ["2", "4", "6"]  # nothing written, nothing pruned


def test_nan_optimizer_state_is_never_checkpointed_and_keep_spares_the_earlier(workdir, monkeypatch):
    """A NaN in the optimizer state (as a flipped `nu` once made): training stops, checkpoints 2, 4, 6 survive
    keep=3, and no checkpoint holds a non-finite value."""
    real = Checkpointer.restore_latest

    def poisoned(self, abstract_state, data_iterator=None, log=None):
        step, state = real(self, abstract_state, data_iterator, log)
        nan_state = _with_nan_in_nu(jax.device_get(state))
        return step, jax.device_put(nan_state, jax.tree.map(lambda x: x.sharding, state))

    monkeypatch.setattr(Checkpointer, "restore_latest", poisoned)
    data_dir = json.load(open(workdir / "config.json"))["data"]["data_dir"]
    config = fi.config_lib.apply_overrides(fi.config_lib.load_config_file(fi.TINY), [
        f"config.data.data_dir={data_dir}", "config.train.steps=12", "config.checkpoint.every_steps=2",
        "config.checkpoint.keep=3", "config.train.log_every=2"])
    with pytest.raises((NonFiniteStateError, NonFiniteError)):
        train(config, str(workdir), verbose=False)
    monkeypatch.undo()
    ck = str(workdir / "checkpoints")
    assert sorted(os.listdir(ck), key=int) == ["2", "4", "6"]
    fi.load_pristine(str(workdir))  # all three still verify (and hold only finite values)


def test_keep_prunes_only_once_the_newest_save_is_durable(workdir, pristine):
    ck = str(workdir / "checkpoints")
    state = jax.tree.map(jnp.asarray, pristine.states[6])
    ckpt = Checkpointer(ck, keep=2, async_save=True)
    ckpt.save(8, state, force=True)
    assert {"2", "4", "6"} <= set(os.listdir(ck))  # in flight: nothing deleted yet
    ckpt.wait()
    assert sorted(os.listdir(ck), key=int) == ["6", "8"]
    ckpt.close()


def test_failed_async_save_names_its_step_and_deletes_nothing(workdir, pristine, monkeypatch):
    ck = str(workdir / "checkpoints")
    state = jax.tree.map(jnp.asarray, pristine.states[6])
    ckpt = Checkpointer(ck, keep=1, async_save=True)
    ckpt.save(8, state, force=True)

    def fail(self):
        raise ValueError("RESOURCE_EXHAUSTED: Error writing local file \"x\": [os_error_code='28']")

    monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished", fail)
    with pytest.raises(CheckpointWriteError, match=r"writing checkpoint 8 .*No space left on device") as e:
        ckpt.save(10, state, force=True)  # the failure of 8 surfaces at the next save
    assert "\n" not in str(e.value)
    monkeypatch.undo()
    ckpt.close()
    assert {"2", "4", "6"} <= set(os.listdir(ck))


def test_legacy_checkpoint_loads_unverified_with_a_note(tmp_path, capsys):
    w = tmp_path / "legacy"
    shutil.copytree(LEGACY, w)
    assert mmjax.load(str(w), step=2).step == 2
    assert "written before checkpoints carried checksums; loaded unverified" in capsys.readouterr().out


def _can_mount():
    return hasattr(os, "geteuid") and os.geteuid() == 0 and os.path.exists("/bin/mount")


@pytest.mark.skipif(not _can_mount(), reason="needs root to mount a small tmpfs as a full disk")
def test_full_disk_during_an_async_save_is_one_line_naming_its_step(tmp_path, pristine):
    """The real command (Orbax's tracebacks and asyncio's "Task exception was never retrieved" come out at exit)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(
        os.path.join(pristine.workdir, "checkpoints", "2")) for f in fs)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size * 1.5) // 1024}k", "tmpfs", str(mnt)], check=True)
    try:
        w = tmp_path / "w"
        w.mkdir()
        os.symlink(mnt, w / "checkpoints")
        data_dir = json.load(open(os.path.join(pristine.workdir, "config.json")))["data"]["data_dir"]
        r = subprocess.run([sys.executable, "-m", "mmjax", "train", "--config", fi.TINY, "--workdir", str(w), "--quiet",
                            "--config.train.steps=6", "--config.checkpoint.every_steps=2",
                            f"--config.data.data_dir={data_dir}"], env=mmjax_env(), cwd=fi.ROOT,
                           capture_output=True, text=True, timeout=600)
        steps = sorted(os.listdir(mnt))
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
    assert r.returncode == 1, r.stderr[-3000:]
    err = "\n".join(line for line in r.stderr.splitlines() if "TPU" not in line and "libtpu" not in line)
    assert "Traceback" not in err and "ERROR:" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("mmjax: error:")]
    assert len(errors) == 1 and "writing checkpoint 4 " in errors[0] and "No space left on device" in errors[0]
    assert "untouched: [2]" in errors[0] and "2" in steps  # the earlier checkpoint is kept
