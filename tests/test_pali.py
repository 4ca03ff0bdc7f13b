"""Task 'prefix_lm' (PaLI-style multitask answering): the loss reads the answer only, the prefix is bidirectional
and the answer causal, the mixture follows its weights and never draws a held-out combination, cached greedy
answers equal step-by-step full recomputation, the VQA metric on hand-made answers, and a short training run
that answers better than its initialisation (through `mmjax train` and `mmjax.load(W).answer`)."""

import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mmjax
from mmjax import cli
from mmjax.config import BOS_ID, EOT_ID, PAD_ID, base_config
from mmjax.data import multitask
from mmjax.data.tokenizers import get_tokenizer
from mmjax.errors import MmjaxError
from mmjax.eval import vqa
from mmjax.models import pali
from mmjax.tasks import prefix_lm
from mmjax.training.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(__file__))
TINY = os.path.join(ROOT, "tests", "tiny_config.py")


def tiny_config():
    c = base_config()
    c.task = "prefix_lm"
    c.model.image.update(image_size=16, patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64)
    c.model.prefix_lm.update(width=32, depth=2, num_heads=2, mlp_dim=64, max_len=70)
    return c


def test_vqa_metric_on_hand_made_answers():
    assert vqa.normalize_answer("  The Seven. ") == "7"
    assert vqa.normalize_answer("Yes!") == "yes" and vqa.normalize_answer("a dog's bone") == "dog s bone"
    assert vqa.normalize_answer("1,000 cats") == "1000 cats" and vqa.normalize_answer("3.5") == "3.5"
    assert vqa.answer_accuracy("seven", "7") == 1.0 and vqa.answer_accuracy("six", "7") == 0.0
    refs = ["yes"] * 2 + ["no"] * 8  # VQAv2 soft accuracy: min(#humans / 3, 1)
    assert vqa.answer_accuracy("Yes", refs) == pytest.approx(2 / 3)
    assert vqa.answer_accuracy("no", refs) == 1.0 and vqa.answer_accuracy("maybe", refs) == 0.0
    assert vqa.accuracy(["7", "two", "no"], ["7", ["2", "two", "2"], "yes"]) == pytest.approx(2 / 3)
    table = vqa.vqa_table({"vqa/plus/accuracy": 0.9, "vqa/heldout/plus/accuracy": 0.5}, {"plus": 10})
    assert "| plus | 0.900 | 10 | 0.500 |" in table


def test_loss_reads_only_the_answer_tokens():
    b, s, v, start = 3, 12, 16, 7
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(b, s - 1, v)), jnp.float32)
    tokens = rng.integers(3, v, size=(b, s)).astype(np.int32)
    tokens[:, start - 1] = BOS_ID
    tokens[:, 10], tokens[:, 11] = EOT_ID, PAD_ID
    loss = prefix_lm.answer_loss(logits, jnp.asarray(tokens), start)[0]
    changed = tokens.copy()
    changed[:, 1:start] = rng.integers(3, v, size=(b, start - 1))  # media slots, prompt, BOS targets
    changed[:, 11] = PAD_ID
    assert float(prefix_lm.answer_loss(logits, jnp.asarray(changed), start)[0]) == float(loss)
    changed[:, start + 1] = (tokens[:, start + 1] + 1 - 3) % (v - 3) + 3  # an answer token
    assert abs(float(prefix_lm.answer_loss(logits, jnp.asarray(changed), start)[0]) - float(loss)) > 1e-4


@pytest.fixture(scope="module")
def tiny_model():
    c = tiny_config()
    model = pali.build_prefix_lm(c.model)
    m = sum(pali.media_slots(c.model))
    length = pali.sequence_length(c.model) - 1
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32),
             "tokens": jnp.asarray(rng.integers(3, 200, size=(2, length)), jnp.int32)}
    params = model.init(jax.random.key(0), batch)["params"]
    return c, model, params, batch, m


def test_prefix_is_bidirectional_and_the_answer_causal(tiny_model):
    c, model, params, batch, m = tiny_model
    prefix = m + c.model.prefix_lm.prompt_len + 1
    logits = model.apply({"params": params}, batch)

    def changed_at(pos):
        tokens = batch["tokens"].at[:, pos].set((batch["tokens"][:, pos] + 7) % 250 + 3)
        return model.apply({"params": params}, dict(batch, tokens=tokens))

    diff = np.abs(np.asarray(changed_at(prefix - 5) - logits)).max(axis=(0, 2))  # a prompt token
    assert diff[:prefix - 5].min() > 1e-6  # earlier prefix positions see it: bidirectional
    answer = prefix + 3
    diff = np.abs(np.asarray(changed_at(answer) - logits)).max(axis=(0, 2))
    assert diff[:answer].max() == 0.0 and diff[answer:].min() > 1e-6  # the answer is causal
    other = model.apply({"params": params}, dict(batch, image=batch["image"][::-1]))
    assert np.abs(np.asarray(other - logits)).max(axis=(1, 2)).min() > 1e-6  # the image reaches the decoder
    muted = model.apply({"params": params}, dict(batch, media=jnp.zeros((2, 2))))
    blind = model.apply({"params": params}, dict(batch, image=batch["image"][::-1], media=jnp.zeros((2, 2))))
    np.testing.assert_array_equal(np.asarray(muted), np.asarray(blind))  # media flag 0: the image is not read


def test_cached_greedy_answers_equal_full_recomputation(tiny_model):
    c, model, params, batch, m = tiny_model
    lp, n = c.model.prefix_lm.prompt_len, 5
    prompt = batch["tokens"][:, m:m + lp]
    out = jax.jit(lambda p: pali.generate(model, {"params": p}, {"image": batch["image"], "prompt": prompt},
                                          n))(params)
    start = m + lp + 1
    seq = jnp.concatenate([jnp.zeros((2, m), jnp.int32), prompt, jnp.full((2, 1), BOS_ID, jnp.int32),
                           jnp.zeros((2, n), jnp.int32)], axis=1)
    full_pass = jax.jit(lambda p, s: model.apply({"params": p}, dict(batch, tokens=s)))
    for t in range(n):  # full passes without a cache; later (causal) positions do not change earlier logits
        logits = full_pass(params, seq)
        seq = seq.at[:, start + t].set(jnp.argmax(logits[:, start + t - 1], -1).astype(jnp.int32))
    full = np.asarray(seq[:, start:start + n])
    got = np.asarray(out.tokens)
    for row in range(2):
        k = int(out.lengths[row])
        np.testing.assert_array_equal(got[row, :k], full[row, :k])


def _mixture(weights, held_out=()):
    c = tiny_config()
    c.model.prefix_lm.tasks = tuple(zip(multitask.TASK_NAMES, weights))
    c.model.prefix_lm.held_out = held_out
    return multitask.mixture_tables(c.model.prefix_lm, get_tokenizer(c.model.text))


def test_the_mixture_follows_its_weights_in_a_batch():
    weights = (1.0, 2.0, 0.0, 3.0, 4.0, 1.0, 1.0)
    tables = _mixture(weights)
    labels = jnp.asarray(np.random.default_rng(0).integers(0, 10, 8192), jnp.int32)
    ex = jax.jit(lambda k, y: prefix_lm.mix_batch(k, y, tables, 4))(jax.random.key(1), labels)
    freq = np.bincount(np.asarray(ex["task"]), minlength=7) / 8192
    expected = np.asarray(weights) / sum(weights)
    assert np.all(np.abs(freq - expected) <= 4 * np.sqrt(expected * (1 - expected) / 8192)), (freq, expected)
    assert freq[2] == 0.0
    tokens, task, k, digit = (np.asarray(ex[key]) for key in ("tokens", "task", "k", "digit"))
    tok = get_tokenizer(base_config().model.text)
    for i in range(40):  # every sequence is its task's prompt, BOS and answer
        name = multitask.TASK_NAMES[task[i]]
        assert tok.decode(tokens[i, 4:4 + 40][None])[0] == multitask.prompt(name, k[i])
        assert tokens[i, 44] == BOS_ID
        assert tok.decode(tokens[i, 45:][None])[0] == multitask.answer(name, k[i], digit[i])
    speaker = task == multitask.TASK_NAMES.index("speaker_match")
    assert np.array_equal(k[speaker], (digit[np.asarray(ex["partner"])] == digit)[speaker].astype(np.int32))


def test_held_out_combinations_never_reach_a_training_batch():
    held = (("plus", 3, 6), ("greater", -1, 2), ("even", 0, 5))
    tables = _mixture((1.0,) * 7, held)
    labels = jnp.asarray(np.random.default_rng(0).integers(0, 10, 4096), jnp.int32)
    draw = jax.jit(lambda k, y: prefix_lm.mix_batch(k, y, tables, 4))
    seen = set()
    for seed in range(4):
        ex = draw(jax.random.key(seed), labels)
        names = [multitask.TASK_NAMES[t] for t in np.asarray(ex["task"])]
        seen |= set(zip(names, np.asarray(ex["k"]).tolist(), np.asarray(ex["digit"]).tolist()))
    assert ("plus", 3, 6) not in seen and ("even", 0, 5) not in seen
    assert not [s for s in seen if s[0] == "greater" and s[2] == 2]
    assert ("plus", 4, 6) in seen and ("plus", 3, 5) in seen and ("greater", 3, 3) in seen


def test_config_problems_name_the_sequence_and_the_tasks():
    c = tiny_config()
    c.model.prefix_lm.max_len = 40
    c.model.prefix_lm.held_out = (("plus", 12, 6),)
    c.model.prefix_lm.tasks = (("caption", 1.0), ("transcribe", 1.0))
    problems = prefix_lm.PrefixLMTask().config_problems(c)
    assert any("hear clips" in p for p in problems) and any("K must be one of" in p for p in problems)
    c.model.prefix_lm.held_out, c.model.prefix_lm.tasks = (), (("caption", 1.0),)
    assert any("needs 66 positions" in p for p in prefix_lm.PrefixLMTask().config_problems(c))


@pytest.mark.slow
def test_a_short_run_lowers_the_answer_loss_and_answers_through_load(tmp_path):
    """Training reduces the loss on the answer tokens, and `mmjax.load(W).answer` answers, warns about a task
    the model was not trained on, and refuses a prompt longer than its context. (The accuracy targets of
    configs/pali_digits.py need its full run: docs/generative.md.)"""
    data_dir = tmp_path / "tfds"
    common = ["--config", TINY, "--quiet", "--config.task=prefix_lm", f"--config.data.data_dir={data_dir}",
              "--config.model.image.patch_size=8", "--config.model.prefix_lm.max_len=70",
              "--config.model.prefix_lm.tasks=(('what_number', 1.0), ('even', 1.0))",
              "--config.model.prefix_lm.held_out=()", "--config.train.batch_size=32", "--config.eval.batch_size=128"]
    assert cli.main(["train", *common, "--workdir", str(tmp_path / "run"), "--config.train.steps=30",
                     "--config.optim.lr=0.003", "--config.optim.warmup_steps=5"]) == 0
    losses = [r["loss"] for r in read_metrics(str(tmp_path / "run")) if "loss" in r]
    assert len(losses) == 30 and np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses
    model = mmjax.load(str(tmp_path / "run"))
    images = (np.random.default_rng(0).random((2, 20, 24)) * 255).astype(np.uint8)  # gray, another size
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        answers = model.answer(images, "answer en is it even?")
    assert len(answers) == 2 and all(a in ("yes", "no") for a in answers), answers
    with pytest.warns(UserWarning, match="names no task this model was trained on"):
        model.answer(images, ["answer en what is it plus 3?", "translate en fr"])
    with pytest.raises(MmjaxError, match="this model reads at most 40"):
        model.answer(images[:1], "answer en " + "why " * 20)
