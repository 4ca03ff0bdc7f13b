"""Task 'flamingo': identity at initialisation, media-position masking, the loss of an empty sequence, packing,
cached generation, and (slow) the two stages through `mmjax train` with frozen weights bit-identical."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mmjax
from mmjax import cli
from mmjax.config import load_config_file
from mmjax.data import interleaved
from mmjax.data.digits import CLASS_NAMES
from mmjax.data.tokenizers import get_tokenizer
from mmjax.models.flamingo import jit_generate, media_position_mask
from mmjax.models.layers import strip_boxes
from mmjax.tasks import get_task
from mmjax.tasks.flamingo import flamingo_objective
from mmjax.training.init_from import merge_params
from mmjax.training.optim import param_path

ROOT = os.path.dirname(os.path.dirname(__file__))
LM_CONFIG = os.path.join(ROOT, "configs", "flamingo_lm_digits.py")
CONFIG = os.path.join(ROOT, "configs", "flamingo_digits.py")
DEMO_CONFIG = os.path.join(ROOT, "configs", "demo.py")
TINY = dict(width=32, depth=2, num_heads=2, mlp_dim=64)


def _config(path=CONFIG):
    c = load_config_file(path)
    c.model.text.update(**TINY)
    c.model.image.update(image_size=16, patch_size=8, **dict(TINY, depth=1))
    c.model.flamingo.update(num_latents=2, resampler_depth=1, resampler_heads=2, resampler_mlp_dim=32)
    return c


@pytest.fixture(scope="module")
def models():
    """(config, flamingo model, its params with the LM's copied in, text-only LM, its params, interleaver)."""
    c, lm_c = _config(), _config(LM_CONFIG)
    model, lm = get_task(c).build_model(c.model), get_task(lm_c).build_model(lm_c.model)
    inter = interleaved.Interleaver(get_tokenizer(c.model.text))
    tokens = jnp.asarray([inter.prompt(["seven", "two"])])
    images = jnp.zeros((1, 3, 16, 16, 3))
    params = strip_boxes(model.init(jax.random.key(0), {"text": tokens, "image": images})["params"])
    lm_params = strip_boxes(lm.init(jax.random.key(1), {"text": tokens})["params"])

    params, _ = merge_params(params, lm_params)  # the LM's parameters into the Flamingo tree, as init_from does
    return c, model, params, lm, lm_params, inter


def _batch(inter, words_rows, n_images, seed=0):
    tokens = np.zeros((len(words_rows), 48), np.int32)
    for i, words in enumerate(words_rows):
        ids = inter.prompt(words)
        tokens[i, :len(ids)] = ids
    images = jax.random.normal(jax.random.key(seed), (len(words_rows), n_images, 16, 16, 3))
    return {"text": jnp.asarray(tokens), "image": images}


def test_logits_equal_the_frozen_lm_at_initialisation(models):
    c, model, params, lm, lm_params, inter = models
    batch = _batch(inter, [["seven", "two"], ["one", "nine"]], 3)
    logits = model.apply({"params": params}, batch)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(lm.apply({"params": lm_params}, batch)))
    # and the gates are what makes it so: opened, the images change the logits
    opened = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 1.0 if "xattn_gate" in jax.tree_util.keystr(p) else x, params)
    assert not np.allclose(np.asarray(model.apply({"params": opened}, batch)), np.asarray(logits))


def test_a_text_token_cannot_see_a_later_image(models):
    c, model, params, _, _, inter = models
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 1.0 if "xattn_gate" in jax.tree_util.keystr(p) else x, params)  # gates open
    batch = _batch(inter, [["seven", "two"]], 3)
    tokens = np.asarray(batch["text"][0])
    second = int(np.flatnonzero(tokens == inter.image_id)[1])  # the second <image>
    changed = dict(batch, image=batch["image"].at[:, 1:].set(5.0))  # images 2 and 3 differ
    before = np.asarray(model.apply({"params": params}, batch))[0]
    after = np.asarray(model.apply({"params": params}, changed))[0]
    np.testing.assert_array_equal(after[:second], before[:second])  # tokens up to image 2 never see it
    assert not np.allclose(after[second:], before[second:])  # from image 2 on, they do
    # the mask itself: image k is seen from the k-th <image> token until the next one, and only then
    mask = np.asarray(media_position_mask(batch["text"], inter.image_id, 3, 2))[0]
    seen = [np.flatnonzero(row[::2]).tolist() for row in mask]  # image index per token ([] = none)
    assert seen[0] == [] and seen[1] == [0] and seen[second] == [1] and seen[second - 1] == [0]


def test_a_sequence_with_no_supervised_token_gives_a_finite_loss(models):
    c, model, params, *_ = models
    objective = flamingo_objective(c)
    batch = {"image": jnp.zeros((5, 16, 16, 3)), "label": jnp.zeros((5,), jnp.int32)}
    loss, metrics = jax.jit(lambda p: objective(model, p, batch, 0))(params)
    assert np.isfinite(float(loss)) and float(metrics["tokens"]) > 0
    # a batch too small for one sequence: nothing to predict -> loss 0, gradients 0, not NaN
    small = {"image": jnp.zeros((5, 16, 16, 3)), "label": jnp.zeros((5,), jnp.int32)}
    c.unlock()
    c.model.flamingo.max_images = 6
    (loss, metrics), grads = jax.jit(jax.value_and_grad(
        lambda p: flamingo_objective(c)(model, p, small, 0), has_aux=True))(params)
    c.model.flamingo.max_images = 5
    assert float(loss) == 0.0 and float(metrics["tokens"]) == 0.0
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))


def test_pack_builds_the_interleaved_sequences(models):
    inter = models[-1]
    table, lengths = inter.chunk_table(CLASS_NAMES)
    tokens = np.asarray(interleaved.pack(table, lengths, jnp.asarray([[7, 2], [0, 1]]), 24))
    expected = inter.prompt(["seven", "two"])[:-1]  # the prompt ends with the query's <image>
    assert tokens[0, :len(expected)].tolist() == expected and not tokens[0, len(expected):].any()
    assert inter.parse("<image> seven. <|endofchunk|><image> two.<|endofchunk|><image>") == \
        inter.prompt(["seven", "two"])
    index, words, answers = interleaved.episodes(np.array([3, 5]), np.arange(40) % 10, 4, 0, madeup=True)
    for w, a in zip(words, answers):
        assert a in interleaved.MADEUP_WORDS and sorted(set(w)) == sorted({a} | set(w)) and len(set(w)) == 2
        assert w.count(a) == 2


def test_cached_generation_equals_recomputation(models):
    c, model, params, *_, inter = models
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 1.0 if "xattn_gate" in jax.tree_util.keystr(p) else x, params)
    batch = _batch(inter, [["seven", "two"], ["one"]], 3, seed=2)
    prompts = batch["text"][:, :17]
    out = jit_generate(model, 4, eos_id=-1)(params, prompts, batch["image"])
    lengths = np.asarray((prompts != 0).sum(1))
    apply = jax.jit(lambda p, b: model.apply({"params": p}, b))
    for row in range(2):  # greedy by full recomputation, token by token (right padding changes nothing before it)
        seq = np.zeros((1, 24), np.int32)
        seq[0, :lengths[row]] = prompts[row, :lengths[row]]
        for t in range(4):
            logits = apply(params, {"text": jnp.asarray(seq), "image": batch["image"][row:row + 1]})
            seq[0, lengths[row] + t] = int(jnp.argmax(logits[0, lengths[row] + t - 1]))
        assert np.asarray(out.tokens[row]).tolist() == seq[0, lengths[row]:lengths[row] + 4].tolist()


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_two_stages_train_frozen_weights_stay_bit_identical_and_generate(tmp_path):
    data_dir, lm_dir, run_dir = tmp_path / "tfds", tmp_path / "lm", tmp_path / "flamingo"
    clip_dir = tmp_path / "clip"  # the vision tower's source: a contrastive run's image encoder
    common = ["--quiet", f"--config.data.data_dir={data_dir}", "--config.train.log_every=1",
              "--config.model.text.width=32", "--config.model.text.mlp_dim=64", "--config.model.image.width=32",
              "--config.model.image.mlp_dim=64", "--config.model.flamingo.resampler_mlp_dim=32",
              "--config.train.batch_size=40", "--config.eval.batch_size=64", "--config.checkpoint.keep=5",
              "--config.optim.warmup_steps=1"]
    assert cli.main(["train", "--config", LM_CONFIG, "--workdir", str(lm_dir), "--config.train.steps=2",
                     "--config.checkpoint.every_steps=2", *common]) == 0
    assert cli.main(["train", "--config", DEMO_CONFIG, "--workdir", str(clip_dir), "--config.train.steps=2",
                     "--config.checkpoint.every_steps=2", "--config.eval.zeroshot=False", *common]) == 0
    assert cli.main(["train", "--config", f"{CONFIG}:{lm_dir},{clip_dir}", "--workdir", str(run_dir),
                     "--config.train.steps=3", "--config.checkpoint.every_steps=1",
                     "--config.model.flamingo.eval_queries=8", *common]) == 0
    final = _records(run_dir)[-1]
    for k in (0, 2, 4):
        assert 0.0 <= final[f"fewshot/{k}shot/accuracy"] <= 1.0
        assert 0.0 <= final[f"fewshot/madeup/{k}shot/accuracy"] <= 1.0

    def flat(workdir, step=None):
        params = jax.device_get(mmjax.load(str(workdir), step=step).params)
        return {param_path(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    lm, first, last = flat(lm_dir), flat(run_dir, 1), flat(run_dir)
    clip = flat(clip_dir)
    vision = [n for n in last if n.startswith("vision/")]
    assert vision and all(np.array_equal(last[n], clip[n.replace("vision/", "image/encoder/", 1)]) for n in vision)
    image_id, eoc_id = interleaved.special_ids(get_tokenizer(_config().model.text))
    table = "lm/token_embed/embedding"
    for name, value in last.items():
        if name == table:
            old = np.ones(len(value), bool)
            old[[image_id, eoc_id]] = False
            np.testing.assert_array_equal(value[old], lm[name][old])  # old rows bit-identical to the LM's
            assert not np.array_equal(value[~old], first[name][~old])  # the new rows train
        elif name.startswith("vision/") or (name in lm and "xattn" not in name):
            np.testing.assert_array_equal(value, first[name], err_msg=name)  # frozen: never moves
            if name in lm:
                np.testing.assert_array_equal(value, lm[name], err_msg=name)  # and is the LM's
        else:  # resampler, gated cross-attention
            assert name.startswith("resampler/") or "xattn" in name, name
    assert any(not np.array_equal(last[n], first[n]) for n in last if n.startswith("resampler/"))
    assert all(last[n] != 0 for n in last if n.endswith("xattn_gate"))
    model = mmjax.load(str(run_dir))
    digits = (np.random.default_rng(0).random((3, 16, 16)) * 255).astype(np.uint8)
    out = model.generate([[digits[0], "seven.", digits[1], "two.", digits[2]], [digits[2]]], max_new_tokens=4)
    assert len(out) == 2 and all(isinstance(t, str) for t in out)
    with pytest.raises(ValueError, match="exceeds the decoder context"):
        model.generate([digits[0]], max_new_tokens=100)
