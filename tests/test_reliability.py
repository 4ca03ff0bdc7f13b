"""Breaking the run on purpose: SIGTERM, non-finite batches, failing storage, invalid configs."""

import os
import signal
import subprocess
import sys
import time

import grain.python as grain
import numpy as np
import pytest
from subprocess_env import mmjax_env
from test_config import TINY, tiny

from mmjax import config as config_lib
from mmjax.config import ConfigError
from mmjax.data import pipeline
from mmjax.training import preflight
from mmjax.training.checkpoint import Checkpointer, CheckpointMismatchError, CheckpointWriteError
from mmjax.training.health import NonFiniteError
from mmjax.training.loop import train
from mmjax.training.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(__file__))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def _tiny(data_dir, *overrides):
    return config_lib.apply_overrides(tiny(), [f"config.data.data_dir={data_dir}", *overrides])


def test_sigterm_checkpoints_the_interrupted_step_and_exits_0(tmp_path, data_dir):
    env = mmjax_env()
    cmd = [sys.executable, "-m", "mmjax", "train", "--config", TINY, "--workdir", str(tmp_path),
           f"--config.data.data_dir={data_dir}", "--config.train.steps=100000",
           "--config.checkpoint.every_steps=100000"]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(read_metrics(str(tmp_path))) < 3:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # a second SIGTERM during the save must not corrupt anything
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    steps = Checkpointer(str(tmp_path / "checkpoints")).all_steps()
    assert len(steps) == 1, out
    stopped = steps[0]
    assert f"stopped after step {stopped}/100000" in out
    assert stopped >= 3
    assert max(m["step"] for m in read_metrics(str(tmp_path))) <= stopped
    assert not os.path.exists(str(tmp_path / "checkpoints.incomplete"))


class _Poisoned(grain.DatasetIterator):
    """Wraps the train iterator; batches for the given (1-based) steps get NaN images."""

    def __init__(self, it, bad_steps):
        super().__init__()
        self.it, self.bad, self.n = it, set(bad_steps), 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = dict(next(self.it))
        self.n += 1
        if self.n in self.bad:
            batch["image"] = np.full_like(batch["image"], np.nan)
        return batch

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        self.it.set_state(state)

    def start_prefetch(self):
        self.it.start_prefetch()


def _poison(monkeypatch, bad_steps):
    real = pipeline.make_train_loader

    def loader(*a, **k):
        return _Poisoned(iter(real(*a, **k)), bad_steps)

    monkeypatch.setattr(pipeline, "make_train_loader", loader)


def test_nonfinite_step_is_skipped_and_counted(tmp_path, data_dir, monkeypatch, capsys):
    _poison(monkeypatch, {3})
    last = train(_tiny(data_dir, "config.train.steps=5"), str(tmp_path), verbose=False)
    out = capsys.readouterr().out
    assert "step 3: non-finite loss" in out and "update skipped" in out
    assert "global examples [32, 48)" in out  # the batch of step 3, with batch size 16
    assert last["skipped_steps"] == 1
    records = {r["step"]: r for r in read_metrics(str(tmp_path)) if "loss" in r}
    assert records[3]["skipped"] == 1 and records[4]["skipped"] == 0
    assert np.isfinite(records[5]["loss"])


def test_k_nonfinite_steps_in_a_row_stop_the_run(tmp_path, data_dir, monkeypatch):
    _poison(monkeypatch, {3, 4, 5, 6})
    c = _tiny(data_dir, "config.train.steps=8", "config.train.max_nonfinite_steps=3",
              "config.checkpoint.every_steps=2")
    with pytest.raises(NonFiniteError, match="3 consecutive steps.*step 5"):
        train(c, str(tmp_path), verbose=False)
    # Checkpoints hold finite states only: updates of the bad steps were skipped.
    steps = Checkpointer(str(tmp_path / "checkpoints")).all_steps()
    assert max(steps) <= 4
    import jax

    import mmjax
    params = jax.device_get(mmjax.load(str(tmp_path)).encoder.params)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def _can_mount():
    return hasattr(os, "geteuid") and os.geteuid() == 0 and os.path.exists("/bin/mount")


@pytest.mark.skipif(not _can_mount(), reason="needs root to mount a small tmpfs as a full disk")
def test_full_disk_stops_cleanly_and_keeps_earlier_checkpoints(tmp_path, data_dir):
    c = _tiny(data_dir, "config.train.steps=4", "config.checkpoint.every_steps=2",
              "config.checkpoint.async_save=False")
    train(c, str(tmp_path), verbose=False)
    metrics_before = (tmp_path / "metrics.jsonl").read_text()
    ckdir = tmp_path / "checkpoints"
    saved = sorted(os.listdir(ckdir))
    # Move the checkpoints onto a tmpfs with room for what is there plus a few KB.
    used = int(subprocess.check_output(["du", "-sk", str(ckdir)]).split()[0]) * 1024  # in blocks
    one_checkpoint = used // len(saved)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={used + one_checkpoint // 2}", "tmpfs", str(mnt)],
                   check=True)
    try:
        subprocess.run(f"cp -a {ckdir}/. {mnt}/", shell=True, check=True)
        subprocess.run(["rm", "-rf", str(ckdir)], check=True)
        os.symlink(mnt, ckdir)
        c2 = _tiny(data_dir, "config.train.steps=12", "config.checkpoint.every_steps=2",
                   "config.checkpoint.async_save=False")
        with pytest.raises(CheckpointWriteError, match="Earlier checkpoints are untouched"):
            train(c2, str(tmp_path), verbose=False)
        after = (tmp_path / "metrics.jsonl").read_text()
        assert after.startswith(metrics_before)  # never truncated
        for step in ("2", "4"):
            assert step in os.listdir(mnt)
        # The earlier checkpoints still restore.
        import mmjax
        assert mmjax.load(str(tmp_path), step=4).step == 4
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
    del saved


# Each invalid config is rejected before compiling with a message naming its key. Cases marked
# "workdir" are refused by `train` on a workdir holding a checkpoint of the tiny config (before the step
# compiles): the config is valid, the checkpoint is not its model's.
INVALID = [
    ("unknown key", ["config.train.stepz=3"], "train.stepz"),
    ("wrong type", ["config.train.batch_size=big"], "train.batch_size"),
    ("mesh product", ["config.mesh.data=3", "config.mesh.fsdp=1"], "mesh"),
    ("two -1 axes", ["config.mesh.data=-1", "config.mesh.fsdp=-1"], "mesh"),
    ("batch not divisible", ["config.train.batch_size=12", "config.mesh.data=8"], "train.batch_size"),
    ("micro-batches do not divide the per-device batch", ["config.train.micro_batches=3"], "train.micro_batches"),
    ("micro-batches for a non-contrastive task", ["config.task=classification", "config.train.micro_batches=2"],
     "train.micro_batches"),
    ("image % patch", ["config.model.image.patch_size=5"], "model.image.patch_size"),
    ("vocab too small", ["config.model.text.vocab_size=100"], "model.text.vocab_size"),
    ("warmup > steps", ["config.optim.warmup_steps=100"], "optim.warmup_steps"),
    ("missing data_dir parent", ["config.data.data_dir=/nonexistent/deep/dir"], "data.data_dir"),
    ("non-existent data_dir of a prepared dataset", ["config.data.name=tfds", "config.data.tfds_name=coco",
                                                     "config.data.data_dir=/nonexistent_tfds"], "data.data_dir"),
    ("evaluator without a dataset", ["config.data.name=tfds", "config.data.tfds_name=coco",
                                     "config.eval.zeroshot=True"], "eval.zeroshot"),
    ("negative eval interval", ["config.eval.every_steps=-5"], "eval.every_steps"),
    ("unknown loss", ["config.model.loss=triplet"], "model.loss"),
    ("unknown activation", ["config.model.activation=relu"], "model.activation"),
    ("unknown decay", ["config.optim.decay=step"], "optim.decay"),
    ("bad dtype", ["config.model.dtype=float8"], "model.dtype"),
    ("bad remat", ["config.model.remat=some"], "model.remat"),
    ("width % heads", ["config.model.text.num_heads=5"], "model.text.width"),
    ("non-positive steps", ["config.train.steps=0"], "train.steps"),
    ("bad pooling", ["config.model.image.pool=max"], "model.image.pool"),
    ("mean/std channels", ["config.data.image_mean=(0.5,)"], "data.image_mean"),
    ("unknown dataset", ["config.data.name=laion"], "data.name"),
    ("unknown mesh axis in rules", ["config.sharding.rules=(('embed', 'model'),)"], "sharding.rules"),
    ("checkpoint interval", ["config.checkpoint.every_steps=0"], "checkpoint.every_steps"),
    ("fine-tune mode that freezes every parameter",
     ["config.finetune.mode=linear_probe", "config.optim.freeze_rules=('.*/head/kernel', 'logit_scale')"],
     "finetune.mode"),
    ("unknown fine-tune mode", ["config.finetune.mode=bitfit"], "finetune.mode"),
    ("audio sample rate mismatch", ["config.data.name=digits_speech", "config.model.towers=('audio', 'text')",
                                    "config.model.pairs=(('audio', 'text', 1.0),)",
                                    "config.model.audio.sample_rate=22050"], "model.audio.sample_rate"),
    ("modality pair without an encoder", ["config.model.pairs=(('audio', 'text', 1.0),)"], "model.pairs"),
    ("init_from a missing workdir", ["config.init_from.path=/nonexistent/run"], "init_from.path"),
    ("workdir: checkpoint of another architecture", ["config.model.image.width=48"], "image"),
    ("workdir: checkpoint of another text vocabulary", ["config.model.text.vocab_size=700"], "text"),
]


@pytest.fixture(scope="module")
def tiny_workdir(tmp_path_factory, data_dir):
    """A workdir holding a step-1 checkpoint of the tiny config."""
    workdir = str(tmp_path_factory.mktemp("tiny_workdir"))
    train(_tiny(data_dir, "config.train.steps=1", "config.optim.warmup_steps=1"), workdir, verbose=False)
    return workdir


@pytest.mark.parametrize("name,overrides,key", INVALID, ids=[i[0] for i in INVALID])
def test_invalid_config_rejected_before_compile(name, overrides, key, request):
    if name.startswith("workdir:"):
        workdir = request.getfixturevalue("tiny_workdir")
        config = config_lib.apply_overrides(tiny(), ["config.train.steps=2", *overrides])
        preflight.check(config, num_devices=8)  # a valid config ...
        with pytest.raises(CheckpointMismatchError) as err:  # ... for another model than the checkpoint's
            train(config, workdir, verbose=False)
        assert key in str(err.value) and "does not match the model" in str(err.value)
        return
    with pytest.raises(ConfigError) as err:
        c = config_lib.apply_overrides(tiny(), overrides)
        preflight.check(c, num_devices=8)
    assert key in str(err.value)
