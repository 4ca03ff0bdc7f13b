"""Tasks beyond contrastive (config.task): classification on image-caption pairs and contrastive + ITM + MLM.

A classification step is the same on 1 and 8 devices; both tasks train end to end through `train()` and write
their metrics; bad task settings are refused naming their keys."""

import jax
import numpy as np
import pytest
from test_config import tiny
from test_sharding import _one_step as sharding_one_step

from mmjax import config as config_lib
from mmjax.config import ConfigError
from mmjax.data import pairs
from mmjax.losses import contrastive as losses
from mmjax.losses import fusion as objectives
from mmjax.models import build_fusion_classifier
from mmjax.training import preflight
from mmjax.training.loop import train
from mmjax.training.metrics import read_metrics


def _task_config(task, *overrides, data_dir=None):
    c = tiny()
    extra = [f"config.task={task}", "config.model.fusion.num_heads=2", "config.model.fusion.mlp_dim=32",
             "config.model.fusion.hidden=16", "config.model.itm_mlm.num_heads=2",
             "config.model.itm_mlm.mlp_dim=32"]
    if data_dir is not None:
        extra.append(f"config.data.data_dir={data_dir}")
    return config_lib.apply_overrides(c, extra + list(overrides))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def _pair_batch(config, n=16, seed=0):
    rng = np.random.default_rng(seed)
    img = config.model.image
    text = rng.integers(3, 259, size=(n, config.model.text.max_len)).astype(np.int32)
    for i, length in enumerate(rng.integers(5, config.model.text.max_len, size=n)):
        text[i, 0], text[i, length - 1], text[i, length:] = 1, 2, 0
    return {"image": rng.normal(size=(n, img.image_size, img.image_size, img.channels)).astype(np.float32),
            "text": text, "label": rng.integers(0, 2, size=n).astype(np.int32)}


def _one_step(config, devices):
    params, metrics, _ = sharding_one_step(config, devices, _pair_batch(config))
    return params, metrics


# xattn: the token-sequence path (masks, both attention directions), with the contrastive term added; the
# pooled-feature modes' sharded outputs are checked module by module in tests/test_fusion.py.
def test_classification_with_contrastive_step_on_8_devices_equals_1_device():
    extra = ("config.model.fusion.mode=xattn", "config.model.fusion.contrastive_weight=0.5")
    one = _task_config("classification", "config.mesh.data=1", *extra)
    eight = _task_config("classification", "config.mesh.data=2", "config.mesh.fsdp=2", "config.mesh.tensor=2",
                         *extra)
    ref_params, ref_metrics = _one_step(one, jax.devices()[:1])
    params, metrics = _one_step(eight, jax.devices())
    assert {"ce_loss", "contrastive_loss", "i2t_acc", "t2i_acc", "logit_scale", "accuracy", "grad_norm", "lr",
            "skipped"} <= set(metrics)
    np.testing.assert_allclose(metrics["loss"], metrics["ce_loss"] + 0.5 * metrics["contrastive_loss"],
                               rtol=1e-6)
    assert metrics["contrastive_loss"] > 0.1
    for key in ("loss", "ce_loss", "contrastive_loss", "accuracy"):
        np.testing.assert_allclose(metrics[key], ref_metrics[key], atol=1e-5, rtol=1e-5)
    assert {"head", "encoder"} == set(params["image"]) == set(params["text"]) and "logit_scale" in params
    flat_ref = jax.tree_util.tree_leaves_with_path(ref_params)
    for (path, a), b in zip(flat_ref, jax.tree.leaves(params)):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=0, err_msg=jax.tree_util.keystr(path))


def test_classification_without_contrastive_has_no_logit_scale():
    config = _task_config("classification", "config.model.fusion.mode=concat")
    model = build_fusion_classifier(config.model)
    variables = jax.eval_shape(model.init, jax.random.key(0),
                               {k: v for k, v in _pair_batch(config, n=4).items() if k != "label"})
    assert "logit_scale" not in variables["params"]


def test_fusion_classifier_embeddings_leave_the_logits_unchanged():
    config = _task_config("classification", "config.model.fusion.contrastive_weight=1.0")
    model = build_fusion_classifier(config.model)
    batch = {k: v for k, v in _pair_batch(config, n=4).items() if k != "label"}
    variables = model.init(jax.random.key(0), batch)
    logits = model.apply(variables, batch)
    out = model.apply(variables, batch, with_embeddings=True)
    np.testing.assert_allclose(out["logits"], logits, atol=1e-6)
    for name in ("image", "text"):
        assert out["embeddings"][name].shape == (4, config.model.embed_dim)
        np.testing.assert_allclose(np.linalg.norm(out["embeddings"][name], axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(out["logit_scale"], np.exp(config.model.logit_scale_init), rtol=1e-5)
    plain = build_fusion_classifier(_task_config("classification").model)  # contrastive_weight 0: no heads
    plain_vars = plain.init(jax.random.key(0), batch)
    assert "logit_scale" not in plain_vars["params"] and set(plain_vars["params"]["image"]) == {"encoder"}
    with pytest.raises(ValueError, match="contrastive_weight"):
        plain.apply(plain_vars, batch, with_embeddings=True)


def test_matched_contrastive_loss_is_clip_over_the_matching_pairs_only():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(2, 12, 8)).astype(np.float32)
    matched = np.array([1, 0, 1, 1, 0, 0, 1, 1, 0, 1, 1, 0], bool)
    loss, metrics = objectives.matched_contrastive_loss(x, y, 3.0, matched)
    ref, ref_metrics = losses.softmax_contrastive_loss(x[matched], y[matched], 3.0)
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    np.testing.assert_allclose(metrics["i2t_acc"], ref_metrics["i2t_acc"], rtol=1e-6)
    np.testing.assert_allclose(metrics["t2i_acc"], ref_metrics["t2i_acc"], rtol=1e-6)
    # Non-matching pairs are neither positives nor negatives: changing them changes nothing, and gets no gradient.
    x2, y2 = x.copy(), y.copy()
    x2[~matched], y2[~matched] = 100.0, -100.0
    np.testing.assert_allclose(objectives.matched_contrastive_loss(x2, y2, 3.0, matched)[0], loss, rtol=1e-6)
    gx, gy = jax.grad(lambda a, b: objectives.matched_contrastive_loss(a, b, 3.0, matched)[0], (0, 1))(x, y)
    assert np.all(np.asarray(gx)[~matched] == 0) and np.all(np.asarray(gy)[~matched] == 0)
    assert np.abs(np.asarray(gx)[matched]).max() > 1e-4
    none, _ = objectives.matched_contrastive_loss(x, y, 3.0, np.zeros(12, bool))
    assert float(none) == 0.0


def test_classification_trains_end_to_end(tmp_path, data_dir):
    config = _task_config("classification", "config.train.steps=4", "config.mesh.data=2", "config.mesh.fsdp=2",
                          "config.mesh.tensor=2", data_dir=data_dir)
    last = train(config, str(tmp_path), verbose=False)
    records = read_metrics(str(tmp_path))
    assert [r["step"] for r in records if "accuracy" in r] == [1, 2, 3, 4]
    assert 0.0 <= last["classify/accuracy"] <= 1.0 and last["classify/num_examples"] == 360
    assert "classify/accuracy" in records[-1]


def test_itm_mlm_trains_end_to_end(tmp_path, data_dir):
    config = _task_config("itm_mlm", "config.train.steps=3", "config.eval.zeroshot=True", data_dir=data_dir)
    last = train(config, str(tmp_path), verbose=False)
    step_metrics = [r for r in read_metrics(str(tmp_path)) if "itm_acc" in r]
    assert [r["step"] for r in step_metrics] == [1, 2, 3]
    for key in ("contrastive_loss", "itm_loss", "mlm_loss", "mlm_acc", "logit_scale"):
        assert np.isfinite(step_metrics[-1][key]), key
    for key in ("zeroshot/top1", "itm/accuracy", "mlm/accuracy"):
        assert 0.0 <= last[key] <= 1.0, key
    assert last["mlm/count"] > 0


def test_pair_stream_is_half_matching_and_deterministic(data_dir):
    config = _task_config("classification", data_dir=data_dir)
    held_out = pairs.load_eval_pairs(config)
    again = pairs.load_eval_pairs(config)
    np.testing.assert_array_equal(held_out["text"], again["text"])
    assert len(held_out["label"]) == 360 and 0.4 < held_out["label"].mean() < 0.6


@pytest.mark.parametrize("overrides, message", [
    (["config.task=captioning"], r"task: unknown task 'captioning'"),
    (["config.task=classification", "config.model.image.width=48", "config.model.fusion.mode=gated"],
     r"model\.fusion\.proj_dim"),
    (["config.task=classification", "config.model.fusion.num_classes=0"], r"model\.fusion\.num_classes"),
    (["config.task=classification", "config.model.fusion.mode=sum"], r"model\.fusion\.mode"),
    (["config.task=classification", "config.model.fusion.contrastive_weight=-1.0"],
     r"model\.fusion\.contrastive_weight must be >= 0"),
    (["config.task=itm_mlm", "config.objectives.mask_id=400"], r"objectives\.mask_id=400 must be < "
                                                               r"model\.text\.vocab_size"),
    (["config.task=itm_mlm", "config.model.loss_impl=chunked"], r"model\.loss_impl"),
])
def test_bad_task_settings_are_named(overrides, message):
    config = config_lib.apply_overrides(tiny(), overrides)
    with pytest.raises(ConfigError, match=message):
        preflight.check(config, num_devices=8)


def test_mismatched_widths_with_proj_dim_are_accepted():
    config = config_lib.apply_overrides(tiny(), ["config.task=classification", "config.model.image.width=48",
                                                 "config.model.fusion.mode=gated",
                                                 "config.model.fusion.proj_dim=32"])
    preflight.check(config, num_devices=8)
