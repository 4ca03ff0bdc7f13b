"""The audio tower in training: N-modality pair losses, config checks, the (image, caption, speech) triple
pipeline, a short audio-text train() with the held-out-voice zero-shot, and the 3-tower step on 1 vs 8 devices."""

import json
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_config import tiny
from test_sharding import _one_step as sharding_one_step

from mmjax import config as config_lib
from mmjax.commands import eval as eval_cmd
from mmjax.data import pipeline, speech, speech_triples
from mmjax.losses import contrastive as losses
from mmjax.models import build_model
from mmjax.tasks.contrastive import make_loss_fn
from mmjax.training import init_from, preflight
from mmjax.training.loop import train

# Built once (digits ~10 s, 1,440 espeak-ng clips ~30 s) and kept between test sessions, like the CPU probe cache.
DATA_DIR = os.path.join(tempfile.gettempdir(), "mmjax-test-data")


def tiny_audio(towers=("image", "text", "audio"), pairs=(("image", "text", 1.0), ("audio", "text", 1.0)),
               overrides=()):
    c = tiny()
    c = config_lib.apply_overrides(c, [
        "config.data.name=digits_speech", f"config.data.data_dir={DATA_DIR}",
        f"config.model.towers={tuple(towers)!r}", f"config.model.pairs={tuple(pairs)!r}",
        "config.model.audio.n_mels=16", "config.model.audio.width=32", "config.model.audio.depth=1",
        "config.model.audio.num_heads=2", "config.model.audio.mlp_dim=64", *overrides])
    return c


def _embeddings(names, b=6, d=8, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for n in names:
        e = rng.normal(size=(b, d)).astype(np.float32)
        out[n] = jnp.asarray(e / np.linalg.norm(e, axis=1, keepdims=True))
    return {"embeddings": out, "logit_scale": jnp.asarray(10.0)}


# ----------------------------------------------------------------------------------------- losses

def test_pairs_with_a_missing_modality_are_skipped():
    outputs = _embeddings(("image", "text"))
    pairs = (("image", "text", 1.0), ("audio", "text", 1.0), ("image", "audio", 3.0))
    loss, metrics = losses.multi_pair_contrastive_loss(outputs, pairs, "softmax")
    ref, ref_metrics = losses.contrastive_loss(outputs, "softmax")
    np.testing.assert_allclose(loss, ref, rtol=1e-6)
    assert "loss/image_text" in metrics and "loss/audio_text" not in metrics and "loss/image_audio" not in metrics
    assert metrics["i2t_acc"] == ref_metrics["i2t_acc"]
    with pytest.raises(ValueError, match="model.pairs"):
        losses.multi_pair_contrastive_loss(_embeddings(("image", "audio")), (("audio", "text", 1.0),), "softmax")


@pytest.mark.parametrize("loss_name", ["softmax", "sigmoid"])
def test_pair_weights_scale_the_pair_losses(loss_name):
    outputs = _embeddings(("image", "text", "audio"))
    outputs["logit_bias"] = jnp.asarray(-2.0)
    pairs = (("image", "text", 2.0), ("audio", "text", 0.5), ("image", "audio", 0.0))
    loss, metrics = losses.multi_pair_contrastive_loss(outputs, pairs, loss_name)
    it = losses.pairwise_contrastive_loss(outputs, "image", "text", loss_name)[0]
    at = losses.pairwise_contrastive_loss(outputs, "audio", "text", loss_name)[0]
    ia = losses.pairwise_contrastive_loss(outputs, "image", "audio", loss_name)[0]
    np.testing.assert_allclose(loss, 2.0 * it + 0.5 * at, rtol=1e-6)
    np.testing.assert_allclose(metrics["loss/audio_text"], at, rtol=1e-6)  # unweighted per-pair figures
    np.testing.assert_allclose(metrics["loss/image_audio"], ia, rtol=1e-6)
    assert {"a2t_acc", "t2a_acc", "i2a_acc", "a2i_acc", "i2t_acc"} <= set(metrics)
    # the weights scale the gradients too: d/d(audio) of the total is 0.5 x that of the audio-text pair alone
    grad = jax.grad(lambda a: losses.multi_pair_contrastive_loss(
        dict(outputs, embeddings=dict(outputs["embeddings"], audio=a)), pairs, loss_name)[0])
    grad_at = jax.grad(lambda a: losses.pairwise_contrastive_loss(
        dict(outputs, embeddings=dict(outputs["embeddings"], audio=a)), "audio", "text", loss_name)[0])
    np.testing.assert_allclose(grad(outputs["embeddings"]["audio"]), 0.5 * grad_at(outputs["embeddings"]["audio"]),
                               rtol=1e-5, atol=1e-7)


def test_default_config_keeps_the_image_text_loss_and_param_tree():
    c = tiny()
    assert tuple(c.model.towers) == ("image", "text")
    outputs = _embeddings(("image", "text"))
    loss, metrics = make_loss_fn(c.model, None)(outputs)
    ref, ref_metrics = losses.contrastive_loss(outputs, "softmax")
    assert loss == ref and set(metrics) == set(ref_metrics)  # no per-pair keys: metrics.jsonl unchanged
    model = build_model(c.model)
    assert [name for name, _, _ in model.towers] == ["image", "text"]  # no audio parameters


# ----------------------------------------------------------------------------------------- config

def _problems(config):
    with pytest.raises(config_lib.ConfigError) as info:
        preflight.check(config, 1)
    return info.value.problems


def test_config_errors_name_the_key():
    c = tiny()
    c = config_lib.apply_overrides(c, ["config.model.pairs=(('image', 'text', 1.0), ('audio', 'text', 1.0))"])
    problems = _problems(c)
    assert any("model.pairs[1]" in p and "no encoder for 'audio'" in p for p in problems), problems

    c = tiny_audio(pairs=(("image", "text", -1.0), ("audio", "text", 1.0)))
    assert any("model.pairs[0]" in p and ">= 0" in p for p in _problems(c))

    c = tiny_audio(overrides=["config.model.audio.sample_rate=22050"])
    problems = _problems(c)
    assert any(p.startswith("model.audio.sample_rate=22050") and str(speech_triples.SAMPLE_RATE) in p
               for p in problems), problems

    c = tiny_audio(overrides=["config.data.name=digits"])
    assert any("model.towers includes 'audio'" in p for p in _problems(c))

    c = tiny_audio(towers=("audio", "text"), pairs=(("audio", "text", 1.0),),
                   overrides=["config.eval.retrieval=True"])
    assert any(p.startswith("eval.retrieval") for p in _problems(c))

    preflight.check(tiny_audio(), 8)  # the 3-tower tiny config itself is valid


# ----------------------------------------------------------------------------------------- data

@pytest.fixture(scope="module")
def data_dir():
    if shutil.which("espeak-ng") is None:
        pytest.skip(f"espeak-ng is not installed; {speech.INSTALL_HINT}")
    from mmjax.data import digits
    digits.prepare(DATA_DIR)
    speech.load(DATA_DIR)
    return DATA_DIR


def test_held_out_voices_are_disjoint_from_training(data_dir):
    clips = speech.load(data_dir)
    train_voices = set(speech_triples.voice_split(clips, "train").voices)
    test = speech_triples.voice_split(clips, "test")
    assert set(test.voices) == set(speech_triples.HELD_OUT_VOICES) and not train_voices & set(test.voices)
    assert len(test) == 240 and len(train_voices) == 20
    assert set(test.labels) == set(range(10))


def test_triple_batches_are_the_same_for_1_and_2_processes(data_dir):
    c = tiny_audio(overrides=["config.train.batch_size=8"])
    one = pipeline.make_train_loader(c, 0, 1)
    ref = [next(one) for _ in range(3)]
    two = [pipeline.make_train_loader(c, p, 2) for p in range(2)]
    parts = [[next(it) for _ in range(3)] for it in two]
    t = speech_triples.num_samples(c)
    for g, batch in enumerate(ref):
        assert batch["audio"]["waveform"].shape == (8, t) and batch["audio"]["waveform"].dtype == np.float32
        assert batch["audio"]["length"].shape == (8,) and (batch["audio"]["length"] <= t).all()
        flat = jax.tree_util.tree_leaves_with_path(batch)
        for path, leaf in flat:
            joined = np.concatenate([np.asarray(_get(parts[p][g], path)) for p in range(2)])
            np.testing.assert_array_equal(joined, leaf, err_msg=jax.tree_util.keystr(path))
        # every clip's samples past its length are zero and its digit is the example's
        w, n = batch["audio"]["waveform"], batch["audio"]["length"]
        assert not np.any(w[np.arange(t)[None] >= n[:, None]])
    # unaugmented, each example's clip is a training-voice clip of the example's digit
    clips = speech.load(data_dir)
    c = tiny_audio(overrides=["config.train.batch_size=8", "config.data.augment=False"])
    batch = next(pipeline.make_train_loader(c, 0, 1))
    for wave, length, label in zip(batch["audio"]["waveform"], batch["audio"]["length"], batch["label"]):
        match = [i for i in range(len(clips)) if clips.lengths[i] == length
                 and np.array_equal(clips.waveforms[i, :length].astype(np.float32) / 32768.0, wave[:length])]
        assert match and all(clips.labels[i] == label for i in match)
        assert clips.voices[match[0]] not in speech_triples.HELD_OUT_VOICES


def _get(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


@pytest.mark.slow  # ~60 s alone on 2 cores (3 minutes under load)
def test_short_audio_text_train_logs_the_audio_zeroshot(data_dir, tmp_path):
    c = tiny_audio(towers=("audio", "text"), pairs=(("audio", "text", 1.0),),
                   overrides=["config.eval.zeroshot=True", "config.train.steps=4", "config.mesh.data=2",
                              "config.train.batch_size=8", "config.eval.batch_size=64"])
    last = train(c, str(tmp_path), devices=jax.devices()[:2], verbose=False)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    final = {k: v for row in rows for k, v in row.items()}
    assert 0.0 <= final["zeroshot/audio/top1"] <= 1.0 and final["zeroshot/top1"] == final["zeroshot/audio/top1"]
    assert "zeroshot/image/top1" not in final and "loss/audio_text" in final and "a2t_acc" in final
    assert last["zeroshot/top1"] == final["zeroshot/top1"]
    # `mmjax eval` on the workdir: the same audio zero-shot for the final checkpoint (1 device against 2, so a
    # near-tie may flip: within one clip of the held-out voices), and no image evaluators without an image tower.
    results = eval_cmd.run(c, str(tmp_path), progress=False, plots=False, out=lambda s: None)
    evaluated = results[max(results)]
    n_clips = len(speech_triples.eval_clips(c, config_lib.data_dir(c))["label"])
    assert abs(evaluated["zeroshot/audio/top1"] - final["zeroshot/audio/top1"]) <= 1.0 / n_clips + 1e-9
    assert evaluated["zeroshot/top1"] == evaluated["zeroshot/audio/top1"]
    assert not any(k.startswith(("retrieval/", "linear_probe/", "zeroshot/image/")) for k in evaluated)


# ----------------------------------------------------------------------------------------- 3 towers, 1 vs 8 devices

def _synthetic_batch(config, n=16, seed=0):
    rng = np.random.default_rng(seed)
    img, t = config.model.image, speech_triples.num_samples(config)
    text = rng.integers(3, 200, size=(n, config.model.text.max_len)).astype(np.int32)
    for i, L in enumerate(rng.integers(5, config.model.text.max_len, size=n)):
        text[i, 0], text[i, L - 1], text[i, L:] = 1, 2, 0
    lengths = rng.integers(t // 4, t, size=n).astype(np.int32)
    waves = (0.1 * rng.normal(size=(n, t))).astype(np.float32) * (np.arange(t)[None] < lengths[:, None])
    return {"image": rng.normal(size=(n, img.image_size, img.image_size, img.channels)).astype(np.float32),
            "text": text, "audio": {"waveform": waves, "length": lengths}}


def _one_step(config, devices):
    params, metrics, _ = sharding_one_step(config, devices, _synthetic_batch(config))
    return params, metrics


def _layout(layout, overrides=()):
    d, f, t = layout
    return tiny_audio(pairs=(("image", "text", 1.0), ("audio", "text", 0.7), ("image", "audio", 0.3)),
                      overrides=[f"config.mesh.data={d}", f"config.mesh.fsdp={f}", f"config.mesh.tensor={t}",
                                 *overrides])


@pytest.fixture(scope="module")
def reference():
    return _one_step(_layout((1, 1, 1)), jax.devices()[:1])


def _assert_same(got, ref):
    params, metrics = got
    ref_params, ref_metrics = ref
    for key in ("loss", "loss/image_text", "loss/audio_text", "loss/image_audio"):
        np.testing.assert_allclose(metrics[key], ref_metrics[key], atol=1e-5, rtol=1e-5, err_msg=key)
    assert set(ref_params) == {"image", "text", "audio", "logit_scale"}
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref_params), jax.tree.leaves(params)):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=0, err_msg=jax.tree_util.keystr(path))


# One layout with every mesh axis > 1, so every partitioning rule of the audio tower is in use; the CLIP trunk's
# step is checked on each layout in tests/test_sharding.py.
@pytest.mark.slow
@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices")
def test_three_tower_step_on_8_devices_equals_1_device(reference):
    _assert_same(_one_step(_layout((2, 2, 2)), jax.devices()), reference)


@pytest.mark.slow
@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices")
def test_three_tower_chunked_loss_equals_plain(reference):
    got = _one_step(_layout((2, 2, 2), ["config.model.loss_impl=chunked", "config.model.loss_chunk_size=2"]),
                    jax.devices())
    _assert_same(got, reference)


# ----------------------------------------------------------------------------------------- fine-tuning the audio tower

def _audio_finetune_config(mode, towers=("audio", "text")):
    return tiny_audio(towers=("audio", "text"), pairs=(("audio", "text", 1.0),), overrides=[
        "config.mesh.data=1", "config.mesh.fsdp=1", "config.optim.warmup_steps=0", "config.optim.decay=constant",
        f"config.finetune.mode={mode}", f"config.finetune.towers={tuple(towers)!r}",
        "config.finetune.adapter_dim=4", "config.finetune.prompt_len=3", "config.finetune.lora_targets=.*"])


@pytest.mark.parametrize("mode,trains", [
    ("adapter", lambda n: "/adapter_attn/" in n or "/adapter_mlp/" in n),
    ("lora", lambda n: n.endswith("/lora_a") or n.endswith("/lora_b")),
    ("prompt", lambda n: n.endswith("/prompts"))])
def test_finetune_modes_reach_the_audio_tower(mode, trains):
    """finetune.towers may name 'audio': the mode's modules go into the audio tower too, two real steps train
    exactly them, and adapters / LoRA leave the audio embeddings as they were at init."""
    from mmjax.runtime import sharding as shd
    from mmjax.tasks import make_objective
    from mmjax.training.optim import param_path
    from mmjax.training.state import StateFactory
    from mmjax.training.step import make_train_step

    config = _audio_finetune_config(mode)
    preflight.check(config, 1, 1)
    mesh = shd.make_mesh(config.mesh, jax.devices()[:1])
    factory = StateFactory(config, mesh)
    state = factory.init(0)

    def flat(tree):
        return {param_path(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}

    before = flat(state.params)
    expected = {n for n in before if trains(n)}
    assert any(n.startswith("audio/") for n in expected) and any(n.startswith("text/") for n in expected)
    batch = _synthetic_batch(config, n=8)
    if mode != "prompt":  # zero-initialised factors: the tuned audio tower equals the plain one at init
        base = StateFactory(_audio_finetune_config("none"), mesh)
        base_params = base.init(0).params
        params, _ = init_from.merge_params(state.params, base_params)
        apply = lambda f, p: np.asarray(f.model.apply({"params": p}, "audio", batch["audio"], method="encode"))
        np.testing.assert_allclose(apply(factory, params), apply(base, base_params), atol=1e-6, rtol=0)
    step = jax.jit(make_train_step(factory.model, factory.tx, factory.schedule, make_objective(config, mesh),
                                   trainable=factory.trainable))
    device_batch = shd.global_batch(batch, mesh)
    with jax.set_mesh(mesh):
        for _ in range(2):
            state, metrics = step(state, device_batch)
    assert np.isfinite(float(metrics["loss"]))
    after = flat(state.params)
    changed = {n for n in before if not np.array_equal(before[n], after[n])}
    assert changed == expected, (sorted(changed - expected), sorted(expected - changed))


def test_finetune_towers_must_be_the_models():
    with pytest.raises(config_lib.ConfigError, match=r"finetune.towers: \('image',\).*\('audio', 'text'\)"):
        preflight.check(_audio_finetune_config("lora", towers=("image",)), 1, 1)
    preflight.check(_audio_finetune_config("none", towers=("image", "text")), 1, 1)  # no modules: ignored
    with pytest.raises(config_lib.ConfigError, match="finetune.mode='locked_image' locks the image tower, but"):
        preflight.check(_audio_finetune_config("locked_image"), 1, 1)
