"""Training end to end on the embedded data: resume equals an uninterrupted run, checkpoints restore
onto other meshes, mismatched workdirs are refused, and the inference API works on a workdir."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from subprocess_env import mmjax_env
from test_config import TINY, tiny

import mmjax
from mmjax import config as config_lib
from mmjax.runtime import sharding as shd
from mmjax.training.checkpoint import Checkpointer
from mmjax.training.loop import train
from mmjax.training.metrics import read_metrics
from mmjax.training.state import StateFactory

ROOT = os.path.dirname(os.path.dirname(__file__))


def _cli(workdir, *extra, devices=8, data_dir):
    env = mmjax_env(devices)
    cmd = [sys.executable, "-m", "mmjax", "train", "--config", TINY, "--workdir", str(workdir),
           "--quiet", f"--config.data.data_dir={data_dir}", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def _params(workdir, devices=None):
    return jax.device_get(mmjax.load(str(workdir), devices=devices).encoder.params)


@pytest.mark.slow
def test_resume_in_fresh_process_equals_uninterrupted(tmp_path, data_dir):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    r = _cli(straight, data_dir=data_dir)
    assert r.returncode == 0, r.stderr
    r = _cli(resumed, "--stop-at-step=4", data_dir=data_dir)
    assert r.returncode == 0, r.stderr
    assert Checkpointer(str(resumed / "checkpoints")).all_steps() == [4]
    r = _cli(resumed, data_dir=data_dir)
    assert r.returncode == 0, r.stderr
    # Same data order: the per-step losses of steps 5..8 are identical, not merely close.
    a = {m["step"]: m["loss"] for m in read_metrics(str(straight))}
    b = {m["step"]: m["loss"] for m in read_metrics(str(resumed))}
    assert sorted(b) == list(range(1, 9))
    assert [a[s] for s in range(1, 9)] == [b[s] for s in range(1, 9)]
    pa, pb = _params(straight), _params(resumed)
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_array_equal(x, y)


def test_checkpoint_restores_on_another_mesh(tmp_path, data_dir):
    c = config_lib.apply_overrides(tiny(), [f"config.data.data_dir={data_dir}", "config.mesh.data=2",
                                            "config.mesh.fsdp=2", "config.mesh.tensor=2",
                                            "config.train.steps=4"])
    train(c, str(tmp_path), verbose=False)
    saved = _params(tmp_path)
    # Restore onto fsdp=8 and onto a single device: same values, new shardings.
    other = config_lib.apply_overrides(tiny(), ["config.mesh.data=1", "config.mesh.fsdp=8",
                                                "config.mesh.tensor=1", "config.train.steps=4"])
    factory = StateFactory(other, shd.make_mesh(other.mesh, jax.devices()))
    ckpt = Checkpointer(str(tmp_path / "checkpoints"))
    state = ckpt.restore(4, factory.abstract)
    ckpt.close()
    kernel = state.params["image"]
    fsdp_sharded = [x for x in jax.tree.leaves(state.params) if "fsdp" in str(x.sharding.spec)]
    assert fsdp_sharded, "restored params should be sharded over fsdp on the new mesh"
    for x, y in zip(jax.tree.leaves(saved), jax.tree.leaves(jax.device_get(state.params))):
        np.testing.assert_array_equal(x, y)
    one = _params(tmp_path, devices=jax.devices()[:1])
    for x, y in zip(jax.tree.leaves(saved), jax.tree.leaves(one)):
        np.testing.assert_array_equal(x, y)
    del kernel


def test_workdir_of_another_model_is_refused_before_compiling(tmp_path, data_dir):
    r = _cli(tmp_path, "--config.train.steps=2", data_dir=data_dir)
    assert r.returncode == 0, r.stderr
    r = _cli(tmp_path, "--config.train.steps=4", "--config.model.image.width=48", data_dir=data_dir)
    assert r.returncode == 2
    assert "does not match the model" in r.stderr and "image" in r.stderr
    assert "Traceback" not in r.stderr


def test_bad_cli_input_is_reported_without_traceback(tmp_path, data_dir):
    r = _cli(tmp_path, "--config.train.batch_size=12", data_dir=data_dir)
    assert r.returncode == 2 and "train.batch_size=12" in r.stderr and "Traceback" not in r.stderr
    r = _cli(tmp_path, "--config.mesh.data=3", data_dir=data_dir)
    assert r.returncode == 2 and "mesh" in r.stderr
    r = _cli(tmp_path, "--config.trian.steps=3", data_dir=data_dir)
    assert r.returncode == 2 and "did you mean 'train'" in r.stderr
    assert not os.path.exists(tmp_path / "checkpoints")


def test_outputs_and_inference_api(tmp_path, data_dir):
    c = config_lib.apply_overrides(tiny(), [f"config.data.data_dir={data_dir}",
                                            "config.eval.zeroshot=True", "config.train.steps=6"])
    last = train(c, str(tmp_path), verbose=False)
    assert 0.0 <= last["zeroshot/top1"] <= 1.0
    records = read_metrics(str(tmp_path))
    assert all("step" in r for r in records)
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 7))
    assert records[-1]["zeroshot/top1"] == last["zeroshot/top1"]
    assert any(f.startswith("events") for f in os.listdir(tmp_path / "tensorboard"))
    assert json.load(open(tmp_path / "config.json"))["train"]["steps"] == 6

    model = mmjax.load(str(tmp_path))
    assert model.step == 6 and model.logit_scale > 0
    rng = np.random.default_rng(0)
    for images in (rng.integers(0, 255, (3, 50, 40), dtype=np.uint8),
                   rng.integers(0, 255, (5, 16, 16, 3), dtype=np.uint8),
                   rng.integers(0, 255, (2, 8, 8, 1), dtype=np.uint8)):
        emb = model.encode_image(images)
        assert emb.shape == (len(images), c.model.embed_dim) and isinstance(emb, np.ndarray)
        np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-5)
    txt = model.encode_text(["a photo of the number seven", "handwritten 7", ""])
    assert txt.shape == (3, c.model.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=-1), 1.0, atol=1e-5)
    # Batching is invisible: one text alone encodes as it does in a batch.
    np.testing.assert_allclose(model.encode_text(["handwritten 7"])[0], txt[1], atol=1e-5)
    with pytest.raises(ValueError, match="step 99"):
        mmjax.load(str(tmp_path), step=99)
