"""Task 'mdm' (BEiT-3): the multiway transformer routes each modality to its own feed-forward expert (exact zero
gradients, outputs independent of the other experts), BEiT's block masking hits its ratio with rectangles, and
masked data modelling on the digits trains through `mmjax train`'s code path (the CLI's `main`) after a VQ
tokenizer trained first by the same command: the masked losses fall, the masked accuracies beat the most frequent target, the
dual encoder is evaluated (with the linear probe next to the same probe at random init, in training's evaluation and
in `mmjax eval`), and the run resumes."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mmjax
from mmjax import cli, tasks
from mmjax import config as config_lib
from mmjax.commands import eval as eval_cmd
from mmjax.config import base_config
from mmjax.data import digits
from mmjax.errors import ConfigError
from mmjax.eval.encoder import TowerEncoder
from mmjax.eval.linear_probe import linear_probe_eval
from mmjax.eval.suite import load_eval_data
from mmjax.models.layers import strip_boxes
from mmjax.models.multiway import MultiwayBlock
from mmjax.runtime import sharding as shd
from mmjax.tasks.mdm import MdmTask, block_mask, mask_inputs, mdm_loss
from mmjax.tasks.mdm_words import digit_word_inputs, keywords_of, whole_word_mask
from mmjax.training.checkpoint import Checkpointer
from mmjax.training.state import StateFactory

ROOT = os.path.dirname(os.path.dirname(__file__))
CONFIG = os.path.join(ROOT, "configs", "beit3_digits.py")
STEPS, HALF = 60, 30
# A small multiway transformer, and a small tokenizer trained first by the same command (8x8 digits -> 4x4 codes of
# a 32-entry codebook).
TINY_MDM = ["--quiet", "--config.model.vq.widths=(16, 32)", "--config.model.vq.codebook_size=32",
            "--config.image_tokenizer.steps=40", "--config.image_tokenizer.batch_size=64",
            "--config.image_tokenizer.lr=0.003", "--config.model.mdm.width=32", "--config.model.mdm.depth=2",
            "--config.model.mdm.num_heads=2", "--config.model.mdm.mlp_dim=64", "--config.model.mdm.vl_layers=1",
            "--config.model.embed_dim=16", "--config.train.batch_size=32", f"--config.train.steps={STEPS}",
            "--config.train.log_every=5", "--config.optim.lr=0.003", "--config.optim.warmup_steps=10",
            f"--config.checkpoint.every_steps={HALF}", "--config.checkpoint.async_save=False",
            "--config.eval.retrieval=False"]


def _tiny_config():
    c = base_config()
    c.task = "mdm"
    c.model.image.update(image_size=8, patch_size=2, channels=1)
    c.data.image_mean, c.data.image_std = (0.5,), (0.5,)
    c.model.text.update(max_len=16)
    c.model.vq.update(widths=(8, 16), codebook_size=16, code_dim=4)
    c.model.mdm.update(width=16, depth=3, num_heads=2, mlp_dim=32, vl_layers=1, min_block_patches=2)
    return c


@pytest.fixture(scope="module")
def tiny():
    """(config, model, params, batch) of a 3-block multiway model (top block with the VL expert)."""
    config, task = _tiny_config(), MdmTask()
    model = task.build_model(config.model)
    rng = np.random.default_rng(0)
    text = np.concatenate([np.ones((4, 1)), rng.integers(3, 259, (4, 12)), np.full((4, 1), 2), np.zeros((4, 2))],
                          axis=1).astype(np.int32)
    batch = {"image": jnp.asarray(rng.normal(size=(4, 8, 8, 1)), jnp.float32), "text": jnp.asarray(text)}
    params = strip_boxes(jax.jit(model.init)(jax.random.key(0), batch)["params"])
    return config, model, params, batch


def _expert_norms(grads):
    """{(block, expert): sum of |grad|} over the experts of every block."""
    return {(b, e): float(sum(jnp.abs(x).sum() for x in jax.tree.leaves(g[e])))
            for b, g in grads["multiway"].items() for e in ("vision", "language", "vl") if e in g}


def test_each_expert_gets_exactly_zero_gradient_from_the_other_modality(tiny):
    config, model, params, batch = tiny

    @jax.jit
    def grads(p):
        def loss(p, part):
            inputs, targets = mask_inputs(config, batch, jax.random.key(1), (part,))
            return mdm_loss(config, model.apply({"params": p}, inputs, parts=(part,)), targets, (part,))[0]
        return {part: jax.grad(loss)(p, part) for part in ("image", "text", "pair")}

    g = jax.device_get(grads(params))
    image, text, pair = (_expert_norms(g[k]) for k in ("image", "text", "pair"))
    assert set(image) == {(f"block_{i}", e) for i in range(3) for e in ("vision", "language")} | {("block_2", "vl")}
    for block in ("block_0", "block_1", "block_2"):
        assert image[(block, "language")] == 0.0 and image[(block, "vision")] > 0  # image-only batch
        assert text[(block, "vision")] == 0.0 and text[(block, "language")] > 0  # text-only batch
    assert image[("block_2", "vl")] == 0.0 and text[("block_2", "vl")] == 0.0
    # Image-text pairs: the lower blocks route image and text positions to their experts, the top block all to VL.
    assert pair[("block_0", "vision")] > 0 and pair[("block_0", "language")] > 0 and pair[("block_2", "vl")] > 0
    assert pair[("block_2", "vision")] == 0.0 and pair[("block_2", "language")] == 0.0
    assert all(float(jnp.abs(x).sum()) == 0.0 for x in jax.tree.leaves(g["image"]["mlm_head"]))
    assert all(float(jnp.abs(x).sum()) == 0.0 for x in jax.tree.leaves(g["text"]["mim_head"]))


def _perturbed(params, expert):
    """params with every parameter of `expert` in every block shifted by noise."""
    def shift(path, x):
        hit = any(getattr(k, "key", None) == expert for k in path)
        return x + jax.random.normal(jax.random.key(len(path)), x.shape) if hit else x
    return jax.tree_util.tree_map_with_path(shift, params)


def test_routing_the_vision_expert_does_not_touch_text_only_outputs(tiny):
    _, model, params, batch = tiny
    other = _perturbed(params, "vision")
    run = jax.jit(lambda p: (model.apply({"params": p}, batch["text"], method="language"),
                             model.apply({"params": p}, batch["text"], method="encode_text"),
                             model.apply({"params": p}, batch["image"], method="vision")))
    (text0, emb0, img0), (text1, emb1, img1) = run(params), run(other)
    np.testing.assert_array_equal(np.asarray(text0), np.asarray(text1))
    np.testing.assert_array_equal(np.asarray(emb0), np.asarray(emb1))
    assert float(jnp.abs(img0 - img1).max()) > 1e-3  # the perturbation matters where the vision expert is routed
    lang = _perturbed(params, "language")
    img2 = jax.jit(lambda p: model.apply({"params": p}, batch["image"], method="vision"))(lang)
    np.testing.assert_array_equal(np.asarray(img0), np.asarray(img2))


def test_a_block_routes_image_positions_to_vision_and_text_positions_to_language():
    block = MultiwayBlock(num_heads=2, mlp_dim=32)
    x = jax.random.normal(jax.random.key(0), (2, 10, 16))
    params = block.init(jax.random.key(1), x, None, "vision")["params"]
    params = dict(params, **block.init(jax.random.key(2), x, None, "language")["params"])
    apply = jax.jit(lambda p: block.apply({"params": p}, x, None, "vl", 4))
    base, vis = apply(params), apply(_perturbed(params, "vision"))
    np.testing.assert_array_equal(np.asarray(base[:, 4:]), np.asarray(vis[:, 4:]))  # text positions untouched
    assert float(jnp.abs(base[:, :4] - vis[:, :4]).min()) > 0  # every image position changed
    lang = apply(_perturbed(params, "language"))
    np.testing.assert_array_equal(np.asarray(base[:, :4]), np.asarray(lang[:, :4]))


def _neighbours(masks, side):
    """Mean number of masked 4-neighbours of a masked patch."""
    m = masks.reshape(-1, side, side).astype(np.int32)
    pad = np.pad(m, ((0, 0), (1, 1), (1, 1)))
    count = pad[:, :-2, 1:-1] + pad[:, 2:, 1:-1] + pad[:, 1:-1, :-2] + pad[:, 1:-1, 2:]
    return float((count * m).sum() / m.sum())


@pytest.mark.parametrize("side,target,min_block", [(14, 78, 16), (4, 6, 2)])
def test_block_masking_hits_the_ratio_with_rectangles(side, target, min_block):
    masks, blocks = jax.device_get(jax.jit(block_mask, static_argnums=(1, 2, 3))(
        jax.random.split(jax.random.key(0), 256), side, target, min_block))
    ratios = masks.sum(axis=1) / side ** 2
    assert abs(ratios.mean() - target / side ** 2) <= 0.05 * target / side ** 2, ratios.mean()
    assert np.all(masks.sum(axis=1) == target)  # each image, exactly (the last rectangles shrink to what is left)
    rows, cols = np.arange(side)[:, None], np.arange(side)[None, :]
    for mask, kept in zip(masks, blocks):  # the mask is exactly the union of the kept rectangles
        union = np.zeros((side, side), bool)
        for top, left, h, w in kept[kept[:, 2] > 0]:
            union |= (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
        np.testing.assert_array_equal(mask.reshape(side, side), union)
    kept = blocks[..., 2] > 0
    assert (masks.sum() / kept.sum()) >= (3.0 if side == 14 else 1.5)  # patches per rectangle: blocks, not pixels
    shuffled = np.stack([np.random.default_rng(i).permutation(m) for i, m in enumerate(masks)])
    assert _neighbours(masks, side) > 1.3 * _neighbours(shuffled, side)  # clumped, unlike the same count at random


def _decode(row):
    """Token ids of the bytes tokenizer -> str, '#' for objectives.mask_id (259), specials dropped."""
    return "".join("#" if t == 259 else chr(t - 3) for t in row if t > 2)


def _caption_config():
    c = _tiny_config()
    c.data.name = "digits"
    c.model.text.update(vocab_size=384, max_len=40, tokenizer="bytes")
    return c


def test_the_digit_word_eval_masks_every_byte_of_the_number_word():
    config, labels = _caption_config(), np.arange(40) % 10
    inputs = digit_word_inputs(config, labels)
    names = digits.CLASS_NAMES
    text, targets, weights = (inputs[k].reshape(40, 10, -1) for k in ("text", "targets", "weights"))
    for i, label in enumerate(labels):
        caption = _decode(targets[i, label])
        assert re.search(rf"\b{names[label]}\b", caption), caption  # the example's own caption names its class
        for k, name in enumerate(names):
            masked = weights[i, k] > 0
            assert _decode(targets[i, k][masked]) == name  # the masked bytes are exactly the candidate word
            assert np.all(text[i, k][masked] == 259) and np.all(text[i, k][~masked] == targets[i, k][~masked])
        assert names[label] not in _decode(text[i, label]).replace(",", " ").replace(".", " ").split()
        # the candidates' inputs depend on the caption's template only, not on the class of the example
        same = [j for j in range(40) if labels[j] != label and
                _decode(targets[j, 0]) == _decode(targets[i, 0])]
        for j in same:
            np.testing.assert_array_equal(text[i], text[j])


def test_whole_word_masking_masks_whole_words_at_about_the_ratio():
    captions = [digits.caption(i % 10, np.random.default_rng(i)) for i in range(64)]
    tokens = np.zeros((64, 40), np.int32)
    for i, c in enumerate(captions):
        row = [1] + [b + 3 for b in c.encode()] + [2]
        tokens[i, :len(row)] = row
    keys = jax.random.split(jax.random.key(0), (4, 64))
    one = jax.jit(jax.vmap(lambda k, t: whole_word_mask(k, t, 0.5, 259, 384, True)))
    masked_share, word_share = [], []
    for key in keys:
        masked, tgt, w = jax.device_get(one(key, jnp.asarray(tokens)))
        for i, c in enumerate(captions):
            chosen = w[i, 1:1 + len(c)] > 0
            for m in re.finditer(r"[A-Za-z0-9]+", c):  # a word is masked entirely or not at all
                assert chosen[m.start():m.end()].all() or not chosen[m.start():m.end()].any(), c
            assert not any(chosen[j] for j, ch in enumerate(c) if not ch.isalnum())  # spaces, punctuation
            np.testing.assert_array_equal(tgt[i][w[i] > 0], tokens[i][w[i] > 0])
            masked_share.append(chosen.mean())
            word_share.append(np.mean([chosen[m.start()] for m in re.finditer(r"[A-Za-z0-9]+", c)]))
    assert abs(np.mean(masked_share) - 0.5) < 0.05, np.mean(masked_share)  # about the ratio of the caption's bytes
    assert 0.5 < np.mean(word_share) < 0.75  # each word with p = ratio x bytes / word bytes


def test_whole_word_masking_always_hides_the_number_word():
    config = _caption_config()
    captions = ["someone wrote the number one", "a sketch of the numeral seven.", "handwritten 7",
                "digit: 0", "a sevens 77 oneone"]
    tokens = np.zeros((len(captions), 40), np.int32)
    for i, c in enumerate(captions):
        row = [1] + [b + 3 for b in c.encode()] + [2]
        tokens[i, :len(row)] = row
    one = jax.jit(jax.vmap(lambda k, t: whole_word_mask(k, t, 0.5, 259, 384, True, keywords_of(config))))
    expected = [{"one"}, {"seven"}, {"7"}, {"0"}, set()]  # not inside 'someone', 'sevens', '77', 'oneone'
    for seed in range(4):
        _, _, w = jax.device_get(one(jax.random.split(jax.random.key(seed), len(captions)), jnp.asarray(tokens)))
        for i, c in enumerate(captions):
            chosen = w[i, 1:1 + len(c)] > 0
            for m in re.finditer(r"[A-Za-z0-9]+", c):
                if m.group() in expected[i]:
                    assert chosen[m.start():m.end()].all(), (c, m.group())


@pytest.mark.parametrize("word_prob", [None, 0.5, 0.0])
def test_pair_masking_masks_whole_words_in_the_configured_share_of_captions(word_prob):
    config = _caption_config()
    if word_prob is not None:  # None: the default
        config.model.mdm.pair_word_mask_prob = word_prob
    share = config.model.mdm.pair_word_mask_prob
    captions = [digits.caption(i % 10, np.random.default_rng(i)) for i in range(128)]
    text = np.zeros((128, 40), np.int32)
    for i, c in enumerate(captions):
        row = [1] + [b + 3 for b in c.encode()] + [2]
        text[i, :len(row)] = row
    batch = {"image": jnp.zeros((128, 8, 8, 1)), "text": jnp.asarray(text)}
    _, targets = jax.device_get(mask_inputs(config, batch, jax.random.key(1), ("pair",)))
    weights = targets["pair"][1]
    whole = 0
    for i, c in enumerate(captions):
        chosen = weights[i, 1:1 + len(c)] > 0
        spans = [chosen[m.start():m.end()] for m in re.finditer(r"[A-Za-z0-9]+", c)]
        split = any(s.any() and not s.all() for s in spans) or any(
            chosen[j] for j, ch in enumerate(c) if not ch.isalnum())
        whole += not split
    # whole-word masked captions never split a word nor mask a space; token-masked ones almost always do
    assert abs(whole / 128 - share) < 0.1, whole
    assert abs(weights[:, 1:].sum() / (text > 2).sum() - 0.5) < 0.06  # pair_text_mask_ratio either way


def _train(config, workdir, data_dir, *extra):
    return cli.main(["train", "--config", config, "--workdir", str(workdir), f"--config.data.data_dir={data_dir}",
                     *extra])


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def test_a_tokenizer_workdir_must_be_wired_in_and_frozen():
    config = _tiny_config()
    tasks.validate(config, 1)  # no tokenizer yet: `mmjax train` trains one first (Task.prepare) and wires it in
    config.image_tokenizer.workdir = "/tmp/some_vq_workdir"  # named, but not loaded by init_from nor frozen
    with pytest.raises(ConfigError) as e:
        tasks.validate(config, 1)
    assert any(p.startswith("init_from.path=") for p in e.value.problems), e.value.problems
    assert any(p.startswith("optim.freeze_rules must freeze the image tokenizer") for p in e.value.problems)
    config.model.mdm.image_weight = 0.0  # text and image-text passes only: no tokenizer needed
    tasks.validate(config, 1)


@pytest.mark.slow
def test_masked_data_modelling_trains_beats_the_baselines_and_resumes(tmp_path, data_dir):
    workdir = tmp_path / "beit3"
    assert _train(CONFIG, workdir, data_dir, *TINY_MDM, f"--stop-at-step={HALF}") == 0  # trains the tokenizer first
    assert _train(CONFIG, workdir, data_dir, *TINY_MDM) == 0  # resumes from step HALF, the tokenizer kept
    records = _records(workdir)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(5, STEPS + 1, 5))  # resumed: no step trained twice
    first, last = steps[0], steps[-4:]
    for part in ("mim", "mlm", "pair_mlm"):
        late = {k: np.mean([r[f"{part}_{k}"] for r in last]) for k in ("loss", "acc", "baseline_acc")}
        assert late["loss"] < first[f"{part}_loss"] - 0.3, (part, first, late)
        assert late["acc"] > late["baseline_acc"] + 0.05, (part, late)
    final = records[-1]
    assert final["step"] == STEPS and "zeroshot/top1" in final  # the dual encoder went through zero-shot
    _check_random_init_probe(workdir, final)
    for part in ("mim", "mlm", "pair_mlm"):  # held-out test split, fixed masks
        assert final[f"mdm/{part}_acc"] > final[f"mdm/{part}_baseline_acc"], final
    # the whole number word masked: without the image the prediction cannot depend on the class (about the prior)
    assert final["mdm/digit_word_text_only_acc"] <= final["mdm/digit_word_prior"] + 0.05, final
    assert 0 <= final["mdm/digit_word_acc"] <= 1 and "mdm/digit_word_spelled_acc" in final
    model = mmjax.load(str(workdir))  # the dual encoder for inference; the tokenizer is the VQ run's, frozen
    vq = _vq_params(workdir / "tokenizer")
    for name in ("encoder", "quantizer"):
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(model.params[name]), vq[name])
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8), np.uint8)
    emb = model.encode_image(images)
    assert emb.shape == (3, 16) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert model.encode_text(["handwritten 7"]).shape == (1, 16)
    not_a_tokenizer = _tiny_config()
    not_a_tokenizer.image_tokenizer.workdir = str(workdir)  # a task 'mdm' workdir
    with pytest.raises(ConfigError, match="is a task 'mdm' workdir, not an image tokenizer"):
        MdmTask().prepare(not_a_tokenizer, str(tmp_path / "other"), train_fn=None)


def _check_random_init_probe(workdir, final):
    """The final record's linear_probe/random_init/top1 is the probe on the run's fresh params (StateFactory.init
    with the run's seed, as training starts, before init_from); `mmjax eval` reports the same next to the
    pretrained probe."""
    assert {"linear_probe/top1", "linear_probe/random_init/top1", "linear_probe/random_init/l2"} <= set(final)
    config = config_lib.load_workdir_config(str(workdir))
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 1, 1
    factory = StateFactory(config, shd.make_mesh(config.mesh, jax.devices()[:1]))
    data = load_eval_data(config)
    fresh = TowerEncoder(factory.model, factory.init(int(config.seed)).params, factory.mesh, factory.rules)
    probe = linear_probe_eval(fresh, data["train"], data["test"])[0]["linear_probe/top1"]
    assert abs(final["linear_probe/random_init/top1"] - probe) <= 2 / 360, (final, probe)  # up to float ties
    evaluated = eval_cmd.run(config, str(workdir), progress=False, plots=False, out=lambda _: None)[STEPS]
    for key in ("linear_probe/top1", "linear_probe/random_init/top1"):
        assert abs(evaluated[key] - final[key]) <= 2 / 360, (key, evaluated, final)


def _vq_params(workdir):
    """The parameters of the latest checkpoint of a task 'vq' workdir (`mmjax.load` serves dual encoders)."""
    config = config_lib.load_workdir_config(str(workdir))
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 1, 1
    factory = StateFactory(config, shd.make_mesh(config.mesh, jax.devices()[:1]))
    ckpt = Checkpointer(os.path.join(str(workdir), "checkpoints"), async_save=False, read_only=True)
    try:
        return jax.device_get(ckpt.restore_latest(factory.abstract)[1].params)
    finally:
        ckpt.close()
