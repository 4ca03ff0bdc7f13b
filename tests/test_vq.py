"""Task 'vq', the image tokenizer: the straight-through estimator, the cosine lookup, the dead-code restart, and
training through `mmjax train`'s code path (the CLI's `main`): it beats the per-pixel-mean baseline, uses the
codebook, round-trips images through `encode_tokens` / `decode_tokens`, and resumes exactly; the independent
classifier of the generation evaluation judges the reconstructions."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mmjax
from mmjax import cli, tasks
from mmjax import config as config_lib
from mmjax.data import pipeline
from mmjax.errors import ConfigError
from mmjax.eval.generation import PixelClassifier
from mmjax.losses import vq as vq_losses
from mmjax.models.layers import strip_boxes
from mmjax.models.vq import VectorQuantizer, VQAutoencoder, l2_normalize
from mmjax.runtime import sharding as shd
from mmjax.tasks.vq import pixel_bounds, real_eval_images, to_pixels
from mmjax.training.checkpoint import Checkpointer
from mmjax.training.metrics import read_metrics
from mmjax.training.state import StateFactory

ROOT = os.path.dirname(os.path.dirname(__file__))
CONFIG = os.path.join(ROOT, "configs", "vq_digits.py")
STEPS, HALF = 60, 30
RECON_GAP = 0.15  # the tiny 60-step tokenizer's reconstructions: at most this much below the originals
# A small tokenizer: 8x8 digits -> 4x4 codes of a 32-entry codebook; checkpoints at HALF and STEPS.
TINY_VQ = ["--quiet", "--config.model.vq.widths=(16, 32)", "--config.model.vq.codebook_size=32",
           "--config.train.batch_size=64", f"--config.train.steps={STEPS}", "--config.train.log_every=5",
           "--config.optim.lr=0.003", "--config.optim.warmup_steps=5", f"--config.checkpoint.every_steps={HALF}",
           "--config.checkpoint.async_save=False"]


def _norm(tree) -> float:
    return float(optax.global_norm(tree))


def test_straight_through_gradient_reaches_the_encoder_and_the_losses_split_it():
    model = VQAutoencoder(widths=(8, 16), res_blocks=1, code_dim=4, codebook_size=16, channels=1)
    images = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))

    def losses(p):
        o = model.apply({"params": p}, {"image": images})
        codebook, commitment = vq_losses.codebook_losses(o["z"], o["quantized"])
        return {"recon": vq_losses.reconstruction_loss(o["reconstruction"], images), "codebook": codebook,
                "commitment": commitment}, o

    @jax.jit  # one compile: init, forward, and the gradient of each loss term
    def run(key):
        params = strip_boxes(model.init(key, {"image": images})["params"])
        terms, out = losses(params)
        return out, {k: jax.grad(lambda q, k=k: losses(q)[0][k])(params) for k in terms}

    out, grads = run(jax.random.key(1))
    assert out["codes"].shape == (4, 4, 4) and out["reconstruction"].shape == images.shape
    np.testing.assert_allclose(out["straight_through"], out["quantized"], atol=1e-6)  # the decoder sees codes
    recon = grads["recon"]  # through the argmax, by the straight-through estimator
    assert _norm(recon["encoder"]["conv_in"]) > 0 and _norm(recon["encoder"]["to_code"]) > 0
    assert _norm(recon["quantizer"]) == 0  # the decoder's input value is the code; its gradient goes to z
    codebook, commitment = grads["codebook"], grads["commitment"]
    assert _norm(codebook["quantizer"]) > 0 and _norm(codebook["encoder"]) == 0
    assert _norm(commitment["encoder"]) > 0 and _norm(commitment["quantizer"]) == 0


def test_codebook_lookup_equals_brute_force_nearest_code():
    quantizer = VectorQuantizer(codebook_size=37, code_dim=6, init_norm=0.1)
    z = 3.0 * jax.random.normal(jax.random.key(0), (5, 7, 9, 6))  # unnormalised latents
    params = jax.jit(quantizer.init)(jax.random.key(1), z)
    out = quantizer.apply(params, z)
    book = np.asarray(strip_boxes(params)["params"]["embedding"], np.float64)
    book /= np.linalg.norm(book, axis=-1, keepdims=True)
    flat = np.asarray(z, np.float64).reshape(-1, 6)
    flat /= np.linalg.norm(flat, axis=-1, keepdims=True)
    expected = [int(np.argmin([np.sum((v - e) ** 2) for e in book])) for v in flat]  # Euclidean, one by one
    np.testing.assert_array_equal(np.asarray(out["codes"]).reshape(-1), expected)
    np.testing.assert_allclose(np.asarray(out["quantized"]).reshape(-1, 6), book[expected], atol=1e-6)
    assert len(set(expected)) > 10  # a real test of the lookup, not of one code


@pytest.mark.parametrize("size, widths, grid", [(8, (16, 32), 4), (8, (16, 32, 32), 2), (32, (32, 64, 64), 8)])
def test_the_grid_of_codes_follows_the_widths(size, widths, grid):
    model = VQAutoencoder(widths=widths, code_dim=8, codebook_size=64, channels=3)
    images = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    params = jax.eval_shape(lambda x: model.init(jax.random.key(0), {"image": x}), images)  # shapes only
    out = jax.eval_shape(lambda p, x: model.apply(p, {"image": x}), params, images)
    assert out["codes"].shape == (2, grid, grid) and out["reconstruction"].shape == (2, size, size, 3)
    codes = jax.ShapeDtypeStruct((2, grid, grid), jnp.int32)
    assert jax.eval_shape(lambda p, c: model.apply(p, c, method="decode"), params, codes).shape == images.shape


def test_config_checks_name_the_key():
    config = config_lib.load_config_file(CONFIG)
    assert tasks.validate(config, 1)  # the shipped config is valid
    config.model.image.image_size, config.model.vq.widths, config.model.vq.recon_loss = 6, (8, 8, 8), "l3"
    with pytest.raises(ConfigError) as e:
        tasks.validate(config, 1)
    text = "\n".join(e.value.problems)
    assert "model.image.image_size=6 is not divisible by" in text and "model.vq.recon_loss: 'l3'" in text


def test_the_independent_classifier_tells_an_untrained_tokenizer_from_the_originals(data_dir):
    config = config_lib.load_config_file(CONFIG)
    config.data.data_dir = data_dir
    config.model.vq.widths, config.model.vq.codebook_size = (16, 32), 32
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 1, 1
    factory = StateFactory(config, shd.make_mesh(config.mesh, jax.devices()[:1]))
    cache = {}
    out = tasks.get_task(config).evaluate(config, factory.model, factory.init(0).params, factory.mesh,
                                          factory.rules, cache)
    data = real_eval_images(config, cache)
    assert data["classifier"] is real_eval_images(config, cache)["classifier"]  # fitted once per cache
    fresh = PixelClassifier(data["train"]["pixels"], data["train"]["label"])  # the held-out accuracy, refitted
    assert out["vq/classifier_accuracy_original"] == fresh.accuracy(data["test"]["pixels"], data["test"]["label"])
    assert out["vq/classifier_accuracy_original"] > 0.9, out
    # an untrained tokenizer's reconstructions carry no digit: the classifier is near chance (0.1) on them
    assert out["vq/classifier_accuracy_reconstructed"] < 0.3, out
    assert out["vq/classifier_accuracy_gap"] == pytest.approx(
        out["vq/classifier_accuracy_original"] - out["vq/classifier_accuracy_reconstructed"])


def _revive(restart_weight: float, steps: int = 100) -> tuple[int, int]:
    """Codes used by 512 latents around one direction (before, after `steps` Adam steps of the codebook alone on
    codebook + restart_weight * dead-code loss), when half the codebook starts on the opposite side."""
    k, d = 16, 4
    center = jnp.array([1.0, 0.0, 0.0, 0.0])
    z = l2_normalize(center + 0.3 * jax.random.normal(jax.random.key(0), (512, d)))
    near = center + 0.3 * jax.random.normal(jax.random.key(1), (k // 2, d))
    far = -center + 0.1 * jax.random.normal(jax.random.key(2), (k // 2, d))  # no latent picks these
    table = 0.1 * l2_normalize(jnp.concatenate([near, far]))

    def used(table):
        return int(jnp.sum(vq_losses.code_counts(jnp.argmax(z @ l2_normalize(table).T, -1), k) > 0))

    def loss(table):
        book = l2_normalize(table)
        codes = jnp.argmax(z @ book.T, -1)
        codebook, _ = vq_losses.codebook_losses(z, book[codes])
        restart, _ = vq_losses.dead_code_loss(z, book, vq_losses.code_counts(codes, k))
        return codebook + restart_weight * restart

    tx = optax.adam(3e-3)

    @jax.jit
    def step(table, state):
        updates, state = tx.update(jax.grad(loss)(table), state)
        return optax.apply_updates(table, updates), state

    state, before = tx.init(table), used(table)
    for _ in range(steps):
        table, state = step(table, state)
    return before, used(table)


def test_dead_code_restart_revives_unused_codes():
    before, revived = _revive(restart_weight=1.0)
    assert before == 8 and revived >= 15, (before, revived)
    _, without = _revive(restart_weight=0.0)
    assert without == 8, without  # the codebook loss alone never moves a code no latent chose


def test_dead_code_loss_touches_only_unused_codes():
    z = l2_normalize(jax.random.normal(jax.random.key(0), (64, 4)))
    book = l2_normalize(jax.random.normal(jax.random.key(1), (8, 4)))
    counts = vq_losses.code_counts(jnp.argmax(z @ book.T, -1), 8).at[3].set(0.0)  # code 3 declared unused
    grad = jax.grad(lambda b: vq_losses.dead_code_loss(z, b, counts)[0])(book)
    dead = np.asarray(counts == 0)
    assert np.all(np.abs(np.asarray(grad))[~dead] == 0) and np.all(np.abs(np.asarray(grad)[dead]).sum(-1) > 0)


def test_clipped_reconstruction_loss_frees_outputs_beyond_the_pixel_range():
    images = jnp.array([[-1.0, 0.2, 1.0]]).reshape(1, 1, 3, 1)  # blank, mid grey, full ink (normalised by 0.5)
    output = jnp.array([[-1.4, 0.1, 1.3]]).reshape(1, 1, 3, 1)  # past both edges, a little off in the middle
    clipped = jax.value_and_grad(
        lambda o: vq_losses.reconstruction_loss(vq_losses.clip_to_bounds(o, (-1.0, 1.0)), images, "l2"))
    loss, grad = clipped(output)
    assert abs(float(loss) - 0.01 / 3) < 1e-6  # only the mid-grey pixel's error counts
    assert np.asarray(grad).ravel().tolist()[0] == 0.0 and np.asarray(grad).ravel().tolist()[2] == 0.0
    plain = vq_losses.reconstruction_loss(output, images, "l2")
    assert float(plain) > float(loss)  # without bounds the overshoot is paid for
    config = config_lib.load_config_file(CONFIG)
    assert pixel_bounds(config) == ((-1.0,), (1.0,))  # mean 0.5, std 0.5: pixels 0 and 1


def test_usage_and_perplexity():
    usage, perplexity = vq_losses.usage_and_perplexity(jnp.array([5.0, 5.0, 5.0, 5.0, 0.0, 0.0, 0.0, 0.0]))
    assert float(usage) == 0.5 and abs(float(perplexity) - 4.0) < 1e-5  # 4 codes used equally
    usage, perplexity = vq_losses.usage_and_perplexity(jnp.array([9.0, 1.0, 0.0, 0.0]))
    assert float(usage) == 0.5 and 1.0 < float(perplexity) < 2.0


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def _train(workdir, data_dir, *extra):
    return cli.main(["train", "--config", CONFIG, "--workdir", str(workdir), f"--config.data.data_dir={data_dir}",
                     *TINY_VQ, *extra])


def _records(workdir):
    return read_metrics(str(workdir))


def _restore(workdir):
    """(config, factory, params) of the latest checkpoint of `workdir` on one device, as `mmjax.load` does."""
    config = config_lib.load_workdir_config(str(workdir))
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 1, 1
    config.lock()
    factory = StateFactory(config, shd.make_mesh(config.mesh, jax.devices()[:1]))
    ckpt = Checkpointer(os.path.join(str(workdir), "checkpoints"), async_save=False, read_only=True)
    try:
        return config, factory, jax.device_get(ckpt.restore_latest(factory.abstract)[1].params)
    finally:
        ckpt.close()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    workdir = tmp_path_factory.mktemp("vq") / "straight"
    assert _train(workdir, data_dir) == 0
    return workdir


def test_training_beats_the_mean_baseline_and_uses_the_codebook(trained):
    records = _records(trained)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(5, STEPS + 1, 5))
    assert all({"usage", "perplexity", "mse", "baseline_mse", "dead_codes"} <= set(r) for r in steps)
    last = steps[-1]
    assert last["mse"] < 0.3 * last["baseline_mse"], last  # well below predicting the batch's per-pixel mean
    assert last["mse"] < 0.5 * steps[0]["mse"]
    assert last["usage"] * 32 >= 12 and last["perplexity"] > 8, last
    final = records[-1]
    assert final["step"] == STEPS and final["vq/num_images"] == 360
    assert final["vq/mse"] < 0.3 * final["vq/baseline_mse"], final  # held-out images, test split
    assert final["vq/psnr"] > final["vq/baseline_psnr"] + 5
    assert final["vq/usage"] * 32 >= 12 and final["vq/perplexity"] > 8, final
    # the independent classifier reads the digit from the reconstructions, almost as well as from the originals
    assert final["vq/classifier_accuracy_original"] > 0.9, final
    assert final["vq/classifier_accuracy_reconstructed"] > final["vq/classifier_accuracy_original"] - RECON_GAP, final


def test_encode_decode_tokens_roundtrip_beats_the_baseline(trained, data_dir):
    config, factory, params = _restore(trained)
    methods = tasks.get_task(config).inference_methods(config, factory.model, params, factory.mesh, factory.rules)
    test = to_pixels(pipeline.load_eval_split(config, "test")["image"], config)  # [360, 8, 8, 1] in [0, 1]
    mean = to_pixels(pipeline.load_eval_split(config, "train")["image"], config).mean(axis=0)
    images = np.round(test[..., 0] * 255).astype(np.uint8)  # uint8 [N, H, W], as a user passes them
    codes = methods["encode_tokens"](images)
    assert codes.shape == (360, 4, 4) and codes.dtype == np.int32 and 0 <= codes.min() and codes.max() < 32
    decoded = methods["decode_tokens"](codes)
    assert decoded.shape == (360, 8, 8, 1) and decoded.min() >= 0 and decoded.max() <= 1
    mse, baseline = np.mean((decoded - test) ** 2), np.mean((mean[None] - test) ** 2)
    assert mse < 0.3 * baseline, (mse, baseline)
    np.testing.assert_array_equal(methods["encode_tokens"](images[:7]), codes[:7])  # batching does not matter
    with pytest.raises(ValueError, match="codes must lie in"):
        methods["decode_tokens"](np.full((1, 4, 4), 32))
    loaded = mmjax.load(str(trained))  # the user's way in: the same two functions on the loaded workdir
    np.testing.assert_array_equal(loaded.encode_tokens(images[:5]), codes[:5])
    assert loaded.logit_scale is None


def test_resume_equals_uninterrupted(trained, tmp_path, data_dir):
    resumed = tmp_path / "resumed"
    assert _train(resumed, data_dir, f"--stop-at-step={HALF}") == 0
    assert Checkpointer(str(resumed / "checkpoints")).all_steps() == [HALF]
    assert _train(resumed, data_dir) == 0
    a = {r["step"]: r["loss"] for r in _records(trained) if "loss" in r}
    b = {r["step"]: r["loss"] for r in _records(resumed) if "loss" in r}
    assert a == b  # every logged step, the resumed half included, bit for bit
    for x, y in zip(jax.tree.leaves(_restore(trained)[2]), jax.tree.leaves(_restore(resumed)[2])):
        np.testing.assert_array_equal(x, y)
