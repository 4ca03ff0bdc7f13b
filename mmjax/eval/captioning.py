"""Captioning: generating captions with a captioner's cached decoder, and scoring them.

Generation (`generate`): a model with `caption_media(images)`, `init_cache(media, length)` and a
`logits_fn` (CoCa: `mmjax.models.coca`) decodes greedily, by beam search or by nucleus sampling
(`mmjax.models.decoding`), jitted once per shape and run in padded batches on the mesh.

Scores (`caption_scores`): pycocoevalcap's BLEU-4, CIDEr-D and ROUGE-L, called directly on captions normalised
here (`normalize`: lower case, punctuation to spaces, whitespace collapsed), since pycocoevalcap's PTB tokenizer
needs Java. CIDEr-D's document frequencies come from the references of the set scored, so compare scores only
over the same references (the most-frequent-caption baseline is scored on them too). Caption-digit accuracy
(`digit_accuracy`): the caption names exactly one number, the image's (number word or numeral).
"""

from __future__ import annotations

import collections
import io
import re
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from PIL import Image
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from mmjax.data import digit_captions, pipeline, sources
from mmjax.data.image import preprocess_images
from mmjax.errors import ConfigError
from mmjax.eval.encoder import batched_apply
from mmjax.models import decoding

_PUNCT = re.compile(r"[^\w\s]")
EMPTY = "_"  # what an empty caption is scored as (it matches no reference word)


def normalize(text: str) -> str:
    """Lower case, punctuation replaced by spaces, whitespace collapsed: 'A Seven, thin.' -> 'a seven thin'."""
    return " ".join(_PUNCT.sub(" ", str(text).lower()).split())


def _scorer_inputs(hypotheses: Sequence[str], references: Sequence[Sequence[str]], caller: str) -> tuple[dict, dict]:
    """pycocoevalcap's inputs, `normalize`d: ({image: [references]}, {image: [caption]}). Raises ValueError (naming
    `caller`) unless there is one caption per image, some images, and a reference for each."""
    if len(hypotheses) != len(references) or not hypotheses:
        raise ValueError(f"{caller} needs one caption per image and some images; got {len(hypotheses)} "
                         f"captions for {len(references)} reference sets")
    gts = {i: [normalize(r) or EMPTY for r in refs] for i, refs in enumerate(references)}
    if any(not refs for refs in gts.values()):
        raise ValueError(f"{caller}: every image needs at least one reference caption")
    return gts, {i: [normalize(h) or EMPTY] for i, h in enumerate(hypotheses)}


def caption_scores(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """One caption per image and its references (at least one each) -> {'bleu4', 'cider', 'rouge_l'} (corpus
    BLEU-4, CIDEr-D and ROUGE-L of pycocoevalcap, on `normalize`d text)."""
    gts, res = _scorer_inputs(hypotheses, references, "caption_scores")
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    rouge, _ = Rouge().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "cider": float(cider), "rouge_l": float(rouge)}


def paired_cider(first: Sequence[str], second: Sequence[str], references: Sequence[Sequence[str]],
                 draws: int = 2000, seed: int = 0) -> dict[str, float]:
    """Two captioners' captions of the same images, scored image by image against the same references (one
    CIDEr-D document frequency table) -> {'cider_diff': mean of first - second, 'cider_diff_low' / '_high': its
    95 % bootstrap interval over the images (`draws` resamples, seeded), 'better' / 'worse': the share of images
    whose first caption scores higher / lower}. Two decoders of one model differ on a few images only, so their
    corpus scores differ by noise unless the interval excludes 0."""
    if not len(first) == len(second) == len(references) or not first:
        raise ValueError(f"paired_cider needs the same images for both: got {len(first)} and {len(second)} "
                         f"captions for {len(references)} reference sets")
    per_image = []
    for hyps in (first, second):
        _, scores = Cider().compute_score(*_scorer_inputs(hyps, references, "paired_cider"))
        per_image.append(np.asarray(scores, np.float64))
    diff = per_image[0] - per_image[1]
    picks = np.random.default_rng(seed).integers(len(diff), size=(int(draws), len(diff)))
    low, high = np.percentile(diff[picks].mean(axis=1), [2.5, 97.5])
    return {"cider_diff": float(diff.mean()), "cider_diff_low": float(low), "cider_diff_high": float(high),
            "better": float(np.mean(diff > 1e-9)), "worse": float(np.mean(diff < -1e-9))}


def digit_accuracy(hypotheses: Sequence[str], labels: Sequence[int]) -> float:
    """Share of captions that name exactly one number, the label (`digit_captions.named_numbers`)."""
    hits = [digit_captions.named_numbers(h) == {int(y)} for h, y in zip(hypotheses, labels, strict=True)]
    return float(np.mean(hits)) if hits else 0.0


def reference_match(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Share of captions equal to one of their image's references after `normalize`. On the digits, whose
    references are every correct caption of the image (each template with the image's attributes), it is the
    share of captions that are entirely right: a measure that cannot depend on which template a caption uses, as
    CIDEr-D can (templates of different shapes made it score a perfect caption 3.73-4.46 by template,
    docs/generative.md)."""
    hits = [normalize(h) in {normalize(r) for r in refs} for h, refs in zip(hypotheses, references, strict=True)]
    return float(np.mean(hits)) if hits else 0.0


def most_frequent_caption(captions: Sequence[str]) -> str:
    """The most frequent caption after `normalize` (ties: the first seen)."""
    return collections.Counter(normalize(c) for c in captions).most_common(1)[0][0]


def caption_eval_data(config, split: str = "test") -> dict:
    """The labelled split's images with their reference captions (`digit_captions.references`), and the most
    frequent reference of the train split (the baseline caption): {'image': float32 [N,H,W,C] preprocessed,
    'label': int32 [N], 'references': [[str]], 'baseline': str}."""
    def raw(which: str) -> list[dict]:
        source, decode = pipeline.make_source(config, which), pipeline.DecodeExample()
        return sorted((decode.map(source[i]) for i in range(len(source))), key=lambda r: int(r["index"]))

    records = raw(split)
    train_refs = [c for r in raw("train") for c in digit_captions.references(int(r["label"]), r["image"])]
    img = config.model.image
    images = preprocess_images(np.stack([r["image"] for r in records]), int(img.image_size), int(img.channels),
                               config.data.image_mean, config.data.image_std)
    return {"image": images, "label": np.array([r["label"] for r in records], np.int32),
            "references": [digit_captions.references(int(r["label"]), r["image"]) for r in records],
            "baseline": most_frequent_caption(train_refs)}


def corpus_caption_eval_data(config, split: str, limit: int) -> dict:
    """A caption corpus's `split` (config.data: a spec or TFDS dataset, the first member of a mixture) as
    captioning evaluation data: its first `limit` images with ALL their captions as references (a COCO-captions
    JSON keeps 5 per image), and the most frequent caption of the first `limit` train records as the baseline:
    {'image': float32 [N,H,W,C] preprocessed, 'label': None (no classes), 'references': [[str]], 'baseline': str}.
    Raises ConfigError naming `eval.caption_split` when the split cannot be opened."""
    member = sources.members(config)[0]

    def records(which: str) -> list[dict]:
        try:
            opened = sources.open_member(member, config, which, progress=False)
        except (KeyError, ValueError, OSError, ConfigError) as error:
            raise ConfigError([f"eval.caption_split={which!r}: the caption corpus {member.label!r} has no readable "
                               f"split {which!r} ({type(error).__name__}: {error})"]) from None
        out = []
        for i in range(min(len(opened.source), int(limit))):
            record = opened.source[i]
            out.append(opened.to_captioned.map(record) if opened.to_captioned is not None else record)
        return out

    def texts(record) -> list[str]:
        return [c.decode("utf-8", "replace") if isinstance(c, bytes) else str(c) for c in record["captions"]]

    evaluated = [r for r in records(split) if len(r["captions"])]
    img = config.model.image
    pixels = [np.asarray(Image.open(io.BytesIO(bytes(r["image"]))).convert("RGB")) for r in evaluated]
    images = preprocess_images(pixels, int(img.image_size), int(img.channels), config.data.image_mean,
                               config.data.image_std)
    baseline = most_frequent_caption([c for r in records("train") for c in texts(r)])
    return {"image": images, "label": None, "references": [texts(r) for r in evaluated], "baseline": baseline}


def decode_fn(model, logits_fn: Callable, max_new_tokens: int, beam: int, top_p: float, eos_id: int,
               pad_id: int, seed: int) -> Callable:
    """(params, {'image' [b,H,W,C], 'prompt' int32 [b,P], 'prompt_len' int32 [b]}) -> {'tokens' [b,N],
    'scores' [b] (summed log-probabilities), 'lengths' [b]}: the best beam, a sample, or the greedy caption."""
    def fn(params, batch):
        variables = {"params": params}
        media = model.apply(variables, batch["image"], method="caption_media")
        cache = model.init_cache(media, batch["prompt"].shape[1] + max_new_tokens)
        kw = dict(max_new_tokens=max_new_tokens, prompt_len=batch["prompt_len"], eos_id=eos_id, pad_id=pad_id)
        if beam > 1:
            out = decoding.beam_search(logits_fn, variables, batch["prompt"], cache, beam_size=beam, **kw)
            return {"tokens": out.tokens[:, 0], "scores": out.scores[:, 0], "lengths": out.lengths[:, 0]}
        if top_p < 1.0:
            key = jax.random.fold_in(jax.random.key(seed), jnp.sum(batch["prompt_len"]))
            out = decoding.sample(logits_fn, variables, batch["prompt"], cache, key, top_p=top_p, **kw)
        else:
            out = decoding.greedy(logits_fn, variables, batch["prompt"], cache, **kw)
        return {"tokens": out.tokens, "scores": out.scores, "lengths": out.lengths}
    return fn


def generate(model, logits_fn: Callable, params, images: np.ndarray, prompt: np.ndarray, mesh: Mesh, rules, *,
             max_new_tokens: int, beam: int = 1, top_p: float = 1.0, batch_size: int = 64, eos_id: int,
             pad_id: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Captions of images float32 [N,H,W,C] (preprocessed) continuing `prompt` int32 [P] (BOS first) ->
    {'tokens' int32 [N,max_new_tokens] (EOS included, then pad_id), 'scores' float32 [N], 'lengths' int32 [N]}.
    beam > 1: beam search (the best beam); else top_p < 1: nucleus sampling (seeded); else greedy."""
    if beam < 1:
        raise ValueError(f"beam must be >= 1; got {beam}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1]; got {top_p}")
    prompt = np.asarray(prompt, np.int32)
    n = len(images)
    fn = jax.jit(decode_fn(model, logits_fn, int(max_new_tokens), int(beam), float(top_p), eos_id, pad_id, seed))
    inputs = {"image": np.asarray(images, np.float32), "prompt": np.broadcast_to(prompt, (n, len(prompt))).copy(),
              "prompt_len": np.full((n,), len(prompt), np.int32)}
    return batched_apply(fn, params, inputs, mesh, rules, batch_size)


def captioning_metrics(hypotheses: Sequence[str], data: dict, prefix: str = "caption/") -> dict[str, float]:
    """Scores of one caption per image of `data` (`caption_eval_data`) -> {prefix + 'digit_accuracy',
    'cider', 'bleu4', 'rouge_l', 'reference_match'}."""
    scores = caption_scores(hypotheses, data["references"])
    scores["reference_match"] = reference_match(hypotheses, data["references"])
    if data["label"] is not None:  # the digits: does the caption name the right number
        scores["digit_accuracy"] = digit_accuracy(hypotheses, data["label"])
    return {prefix + k: v for k, v in scores.items()}


def baseline_metrics(data: dict) -> dict[str, float]:
    """The most-frequent-caption baseline on `data`: 'caption/baseline/cider', '.../bleu4', '.../rouge_l',
    '.../digit_accuracy' (the same caption for every image)."""
    hyps = [data["baseline"]] * len(data["references"])
    return captioning_metrics(hyps, data, "caption/baseline/")
