"""A workdir written by mmjax before its subpackage restructure (tests/fixtures/legacy_workdir_v0, commit
d04bbbd) still loads with the same outputs, resumes training and evaluates. Only the public entry points are
used (`mmjax.load`, `mmjax.cli.main`), so these tests survive moves inside the package. Each test works on a
copy; the fixture is never written."""

import hashlib
import json
import os
import shutil

import numpy as np
import pytest

import mmjax
from mmjax.cli import main

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "fixtures", "legacy_workdir_v0")
TINY = os.path.join(HERE, "tiny_config.py")
# The overrides the fixture was trained with (see its README.md): they give the checkpoints' shapes.
OVERRIDES = ["--config.train.steps=4", "--config.checkpoint.every_steps=2", "--config.checkpoint.keep=2",
             "--config.model.embed_dim=8", "--config.model.image.width=16", "--config.model.image.depth=1",
             "--config.model.image.mlp_dim=32", "--config.model.text.width=16", "--config.model.text.depth=1",
             "--config.model.text.mlp_dim=32"]


def _digest(root):
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            h.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module", autouse=True)
def fixture_untouched():
    before = _digest(FIXTURE)
    yield
    assert _digest(FIXTURE) == before, f"{FIXTURE} was modified; it must never be written"


@pytest.fixture
def workdir(tmp_path):
    w = tmp_path / "legacy"
    shutil.copytree(FIXTURE, w)
    return w


def _metrics(workdir):
    with open(workdir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_load_matches_reference_outputs(workdir):
    ref = np.load(workdir / "reference_outputs.npz")
    images, texts = ref["images"], [str(t) for t in ref["texts"]]
    m = mmjax.load(str(workdir))
    assert m.step == 4
    for step, model in ((4, m), (2, mmjax.load(str(workdir), step=2))):
        assert model.step == step
        np.testing.assert_allclose(model.encode_image(images), ref[f"image_embeddings_step{step}"], atol=1e-5)
        np.testing.assert_allclose(model.encode_text(texts), ref[f"text_embeddings_step{step}"], atol=1e-5)
        np.testing.assert_allclose(model.logit_scale, ref[f"logit_scale_step{step}"], rtol=1e-6)
    # The two checkpoints are different states (the step argument is honoured).
    assert not np.allclose(ref["image_embeddings_step2"], ref["image_embeddings_step4"], atol=1e-5)


def test_train_resumes_from_step_4(workdir, data_dir):
    old = _metrics(workdir)
    assert [r["step"] for r in old] == [1, 2, 3, 4]
    code = main(["train", "--config", TINY, "--workdir", str(workdir), "--quiet", *OVERRIDES,
                 "--config.train.steps=6", f"--config.data.data_dir={data_dir}"])
    assert code == 0
    new = _metrics(workdir)
    # Resumed, not restarted: steps 1-4 are the old records, then exactly steps 5 and 6.
    assert [r["step"] for r in new] == [1, 2, 3, 4, 5, 6]
    assert new[:4] == old
    assert all(np.isfinite(r["loss"]) for r in new[4:])
    assert mmjax.load(str(workdir)).step == 6
    assert mmjax.load(str(workdir), step=4).step == 4  # keep=2: checkpoints 4 and 6


def test_eval_writes_json(workdir, data_dir):
    code = main(["eval", "--config", TINY, "--workdir", str(workdir), "--no-plots", "--quiet", *OVERRIDES,
                 "--config.eval.batch_size=64", f"--config.data.data_dir={data_dir}"])
    assert code == 0
    with open(workdir / "eval" / "4.json") as f:
        m = json.load(f)
    assert m["step"] == 4
    assert "zeroshot/top1" in m and 0.0 <= m["zeroshot/top1"] <= 1.0
