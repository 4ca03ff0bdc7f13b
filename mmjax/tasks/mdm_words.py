"""BEiT-3's text side on byte captions (task 'mdm', `mmjax.tasks.mdm`): whole-word (span) masking of image-text
pairs, so a number word is hidden entirely and must be read from the image, and the evaluation of exactly that
(`digit_word_eval`: every byte of the number word masked, the ten words scored with the image, another image
and none).
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mmjax.data import pipeline
from mmjax.data.tokenizers import get_tokenizer
from mmjax.eval.encoder import batched_apply
from mmjax.losses import fusion as objectives

EVAL_SEED = 0
BYTE_OFFSET = 3  # the bytes tokenizer's id of byte b is b + 3 (ids 0-2: pad, BOS, EOT)


def word_bytes(tokens: jax.Array, bytes_text: bool) -> tuple[jax.Array, jax.Array]:
    """(in_word, word_start), both bool like tokens int [..., L]: for byte text, a word is a maximal run of ASCII
    letters / digits or non-ASCII bytes (spaces and punctuation are in no word, so a number word is masked without
    the '.' or ',' after it); for other tokenizers every non-special token is a word of its own."""
    eligible = ~jnp.isin(tokens, jnp.asarray(objectives.SPECIAL_IDS, jnp.int32))
    if not bytes_text:
        return eligible, eligible
    b = tokens - BYTE_OFFSET
    in_word = eligible & (((b >= 48) & (b <= 57)) | ((b >= 65) & (b <= 90)) | ((b >= 97) & (b <= 122)) | (b >= 128))
    previous = jnp.concatenate([jnp.zeros_like(in_word[..., :1]), in_word[..., :-1]], axis=-1)
    return in_word, in_word & ~previous


def keyword_positions(tokens: jax.Array, keywords: tuple[tuple[int, ...], ...], bytes_text: bool) -> jax.Array:
    """bool like tokens int [L]: the tokens of every whole word (`word_bytes`) of `tokens` that is one of
    `keywords` (each a tuple of token ids)."""
    in_word, start = word_bytes(tokens, bytes_text)
    length = tokens.shape[-1]
    ends = jnp.concatenate([~in_word[1:], jnp.ones((1,), bool)])  # no word byte after this one
    covered = jnp.zeros(tokens.shape, bool)
    for word in keywords:
        n = len(word)
        if not 0 < n <= length:
            continue
        at = start[:length - n + 1] & ends[n - 1:]
        for j, t in enumerate(word):
            at = at & (tokens[j:length - n + 1 + j] == t)
        for j in range(n):
            covered = covered.at[j:length - n + 1 + j].max(at)
    return covered


def whole_word_mask(key: jax.Array, tokens: jax.Array, ratio: float, mask_id: int, vocab_size: int,
                    bytes_text: bool, keywords: tuple[tuple[int, ...], ...] = ()
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Whole-word (span) masking of one caption tokens int [L]: every word that is one of `keywords` (token id
    tuples; `keywords_of`: the class names and numerals, so the number word is hidden entirely) is selected, and
    each other word (`word_bytes`) with probability p such that about `ratio` of the caption's non-special tokens
    are masked, as with `objectives.mask_tokens` (p capped to [0, 1]); every token of a selected word is replaced
    as BERT does (80 % mask_id, 10 % random, 10 % kept). Returns (masked int32 [L], targets int32 [L], weights
    float32 [L]) as `objectives.mask_tokens` does for one row."""
    k_words, k_replace = jax.random.split(key)
    tokens = tokens.astype(jnp.int32)
    in_word, start = word_bytes(tokens, bytes_text)
    words = jnp.cumsum(start) * in_word  # 1, 2, ... per word; 0 outside words
    eligible = ~jnp.isin(tokens, jnp.asarray(objectives.SPECIAL_IDS, jnp.int32))
    forced = keyword_positions(tokens, keywords, bytes_text) & in_word
    budget = ratio * jnp.sum(eligible) - jnp.sum(forced)
    p = jnp.clip(budget / jnp.maximum(jnp.sum(in_word & ~forced), 1), 0.0, 1.0)
    chosen = jax.random.uniform(k_words, (tokens.shape[0] + 1,)) < p
    selected = forced | (in_word & chosen[words])
    replaced = objectives.mask_tokens(tokens[None], k_replace, 1.0, mask_id, vocab_size)[0][0]
    masked = jnp.where(selected, replaced, tokens).astype(jnp.int32)
    return masked, jnp.where(selected, tokens, 0).astype(jnp.int32), selected.astype(jnp.float32)


def keywords_of(config) -> tuple[tuple[int, ...], ...]:
    """The words whole-word masking always hides (`whole_word_mask`), as token ids of the bytes tokenizer: the
    labelled dataset's class names (the number words of the digits) and the numerals 0-9; () for caption
    corpora or other tokenizers."""
    if pipeline.is_captioned(config) or str(config.model.text.tokenizer) != "bytes":
        return ()
    names = list(pipeline.zeroshot_prompts(config)[0]) + [str(i) for i in range(10)]
    return tuple(tuple(b + BYTE_OFFSET for b in name.encode()) for name in dict.fromkeys(names))


def digit_word_inputs(config, labels: np.ndarray, seed: int = EVAL_SEED) -> dict[str, np.ndarray] | None:
    """The inputs of `digit_word_eval` for examples of classes `labels` int [N] (K classes): per example one
    caption naming its class by its number word (drawn with `pipeline.caption_fn` and key `seed` until the
    class name appears as a whole word; its last occurrence), and K copies of it, the k-th with that word replaced
    by class k's, EVERY byte of the word replaced by objectives.mask_id. Returns {'text' int32 [N*K, L] (the
    masked copies, example-major), 'targets' int32 [N*K, L] (the unmasked copies), 'weights' float32 [N*K, L]
    (1 at the masked bytes)}; None for a tokenizer other than 'bytes' (no byte offsets to mask)."""
    if str(config.model.text.tokenizer) != "bytes":
        return None
    names = list(pipeline.zeroshot_prompts(config)[0])
    caption, rng = pipeline.caption_fn(config), np.random.default_rng(seed)
    texts, spans = [], []
    for label in np.asarray(labels):
        word = re.compile(rf"(?<!\w){re.escape(names[int(label)])}(?!\w)")
        for _ in range(1000):
            text = caption(int(label), rng)
            found = list(word.finditer(text))
            if found:
                break
        else:
            raise ValueError(f"no caption of class {int(label)} names it by its word {names[int(label)]!r}")
        start, end = found[-1].span()
        for name in names:
            texts.append(text[:start] + name + text[end:])
            first = 1 + len(text[:start].encode())  # token index: BOS first, then one token per byte
            spans.append((first, first + len(name.encode())))
    targets = np.asarray(get_tokenizer(config.model.text).encode(texts), np.int32)
    weights = np.zeros(targets.shape, np.float32)
    for row, (first, last) in enumerate(spans):
        if last >= targets.shape[1]:
            raise ValueError(f"caption {texts[row]!r} is longer than model.text.max_len={targets.shape[1]}")
        weights[row, first:last] = 1.0
    text = np.where(weights > 0, int(config.objectives.mask_id), targets).astype(np.int32)
    return {"text": text, "targets": targets, "weights": weights}


def _word_score_fn(model: nn.Module):
    def score(p, batch):
        def likelihood(logits):  # sum of log p(target byte) over the masked bytes, and whether argmax spells them
            logp = jax.nn.log_softmax(logits, -1)
            ll = jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
            hit = (jnp.argmax(logits, -1) == batch["targets"]) | (batch["weights"] == 0)
            return jnp.sum(ll * batch["weights"], -1), jnp.all(hit, -1)
        pair = model.apply({"params": p}, {"image": batch["image"], "text": batch["text"]}, parts=("pair",))
        other = model.apply({"params": p}, {"image": batch["other_image"], "text": batch["text"]}, parts=("pair",))
        text = model.apply({"params": p}, {"image": batch["image"], "text": batch["text"]}, parts=("text",))
        out = {}
        for name, logits in (("image", pair["pair_logits"]), ("other_image", other["pair_logits"]),
                             ("text_only", text["mlm_logits"])):
            out[f"{name}_ll"], out[f"{name}_spelled"] = likelihood(logits)
        return out
    return jax.jit(score)


def digit_word_eval(config, model: nn.Module, params, mesh: Mesh, rules, images: np.ndarray,
                    labels: np.ndarray, batch_size: int, cache: dict | None = None) -> dict[str, float]:
    """Whether the model reads the digit: on each example (images [N,H,W,C], labels int [N]) a caption naming
    its class with EVERY byte of the number word masked (`digit_word_inputs`), the predicted class is the argmax
    over the K class words of the summed log-likelihood of the word's bytes at the masked positions (each
    candidate in its own copy of the caption, with as many masks as it has bytes, so the true word's length
    tells nothing). Three ways: the vision-language path with the example's image ('mdm/digit_word_acc'), with
    the next example's image ('..._other_image_acc'), and the language-only path without any image
    ('..._text_only_acc': its inputs do not depend on the true class, so it scores the share of the class it
    always picks, about 'mdm/digit_word_prior', the most frequent class's share). Also 'mdm/digit_word_spelled_acc'
    (the argmax bytes at the true word's masks spell it exactly, with the image) and
    '..._spelled_text_only_acc' (the same without the image: the number of masks gives away the word's length,
    so up to 1/3 here on English words). {} for a tokenizer other than 'bytes'."""
    cache = {} if cache is None else cache
    if "inputs" not in cache:
        cache["inputs"] = digit_word_inputs(config, labels)
    inputs = cache["inputs"]
    if inputs is None:
        return {}
    n, k = len(labels), inputs["text"].shape[0] // len(labels)
    images = np.asarray(images)
    batch = dict(inputs, image=np.repeat(images, k, axis=0),
                 other_image=np.repeat(np.roll(images, 1, axis=0), k, axis=0))
    out = batched_apply(_word_score_fn(model), params, batch, mesh, rules, batch_size)
    labels = np.asarray(labels, np.int64)
    rows = np.arange(n)
    results = {}
    for name, key in (("image", "mdm/digit_word_acc"), ("other_image", "mdm/digit_word_other_image_acc"),
                      ("text_only", "mdm/digit_word_text_only_acc")):
        predicted = np.argmax(out[f"{name}_ll"].reshape(n, k), axis=1)
        results[key] = float(np.mean(predicted == labels))
    results["mdm/digit_word_spelled_acc"] = float(np.mean(out["image_spelled"].reshape(n, k)[rows, labels]))
    results["mdm/digit_word_spelled_text_only_acc"] = float(
        np.mean(out["text_only_spelled"].reshape(n, k)[rows, labels]))
    results["mdm/digit_word_prior"] = float(np.bincount(labels, minlength=k).max() / max(n, 1))
    return results
