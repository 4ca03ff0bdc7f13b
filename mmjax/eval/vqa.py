"""VQA accuracy and the evaluation of task 'prefix_lm' (PaLI-style multitask answering).

Scoring (`answer_accuracy`): answers are normalised as VQAv2's evaluation does (`normalize_answer`: lower case,
punctuation dropped, number words as digits, articles dropped, whitespace collapsed). With one reference the
score is exact match after normalisation; with several (e.g. VQAv2's ten annotators) it is the soft accuracy
min(#references equal to the answer / 3, 1).

`vqa_eval` answers every evaluation set of `mmjax.data.multitask.eval_sets` (held-out images and voices) greedily
and reports 'vqa/<task>/accuracy' and 'vqa/heldout/<task>/accuracy' (the held-out (task, K, digit) combinations),
and 'vqa/accuracy', the mean over the trained tasks; `vqa_table` prints them as one table per task.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import numpy as np

from mmjax.data import multitask, speech_triples
from mmjax.data.tokenizers import get_tokenizer
from mmjax.eval.encoder import batched_apply
from mmjax.models import pali

NUMBER_WORDS = {'none': '0', 'zero': '0', 'one': '1', 'two': '2', 'three': '3', 'four': '4', 'five': '5',
                'six': '6', 'seven': '7', 'eight': '8', 'nine': '9', 'ten': '10'}
ARTICLES = ('a', 'an', 'the')
_PUNCT = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$'|~:]")
_PERIOD = re.compile(r'(?!<=\d)(\.)(?!\d)')  # a period that is not a decimal point
SOFT_HUMANS = 3  # VQAv2: an answer given by 3 of the annotators scores 1


def normalize_answer(text: str) -> str:
    """VQAv2-style normalisation: lower case, punctuation removed (a comma between digits dropped, a period
    kept only inside a number), number words as digits, articles removed, whitespace collapsed."""
    text = text.lower().replace('\n', ' ').replace('\t', ' ').strip()
    text = re.sub(r'(?<=\d),(?=\d)', '', text)
    text = _PERIOD.sub('', _PUNCT.sub(' ', text))
    words = [NUMBER_WORDS.get(w, w) for w in text.split() if w not in ARTICLES]
    return ' '.join(words)


def answer_accuracy(prediction: str, references: Sequence[str] | str) -> float:
    """Exact match after `normalize_answer` against one reference; with several, the VQAv2 soft accuracy
    min(#references equal to the prediction / 3, 1)."""
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ValueError('answer_accuracy needs at least one reference answer')
    pred = normalize_answer(prediction)
    hits = sum(normalize_answer(r) == pred for r in refs)
    return float(hits > 0) if len(refs) == 1 else min(hits / SOFT_HUMANS, 1.0)


def accuracy(predictions: Sequence[str], references: Sequence[Sequence[str] | str]) -> float:
    """Mean `answer_accuracy` over examples (NaN for none)."""
    if len(predictions) != len(references):
        raise ValueError(f'{len(predictions)} predictions but {len(references)} reference sets')
    scores = [answer_accuracy(p, r) for p, r in zip(predictions, references)]
    return float(np.mean(scores)) if scores else float('nan')


def vqa_table(metrics: dict[str, float], counts: dict[str, int] | None = None) -> str:
    """One row per task of 'vqa/<task>/accuracy' metrics: the trained combinations and the held-out ones."""
    tasks = [t for t in multitask.TASK_NAMES
             if f'vqa/{t}/accuracy' in metrics or f'vqa/heldout/{t}/accuracy' in metrics]
    counts = counts or {}
    lines = ['| task | accuracy (held-out images / voices) | n | held-out (task, K, digit) | n |',
             '|---|---|---|---|---|']
    for t in tasks:
        seen, held = metrics.get(f'vqa/{t}/accuracy'), metrics.get(f'vqa/heldout/{t}/accuracy')
        lines.append(f"| {t} | {'-' if seen is None else f'{seen:.3f}'} | {counts.get(t, '-')} | "
                     f"{'-' if held is None else f'{held:.3f}'} | {counts.get(f'heldout/{t}', '-')} |")
    return '\n'.join(lines)


def answer_fn(model: pali.PrefixLM, max_new_tokens: int):
    """Jitted fn(params, batch) -> {'tokens': int32 [b,max_new_tokens]}: greedy answers (`pali.generate`) of
    a flat batch {'image', 'prompt', 'media'(, 'waveform', 'length')}."""
    def fn(params, batch):
        batch = dict(batch)
        if 'waveform' in batch:
            batch['audio'] = {'waveform': batch.pop('waveform'), 'length': batch.pop('length')}
        return {'tokens': pali.generate(model, {'params': params}, batch, max_new_tokens).tokens}
    return jax.jit(fn)


def run_answers(fn, params, inputs: dict[str, np.ndarray], tokenizer, mesh, rules, batch_size: int) -> list[str]:
    """`answer_fn` over inputs (dict of [N, ...]) in padded sharded batches -> N decoded answers."""
    tokens = batched_apply(fn, params, inputs, mesh, rules, batch_size)['tokens']
    return tokenizer.decode(tokens)


def clip_inputs(config, audio, n: int) -> dict[str, np.ndarray]:
    """'waveform' float32 [n,S] and 'length' int32 [n] for the audio tower (S = max_frames * hop - 1) from
    `audio` (None: silence of one sample; a list of 1-D waveforms or an [n,T] array, cut to S)."""
    samples = speech_triples.num_samples(config)
    waves, lengths = np.zeros((n, samples), np.float32), np.ones((n,), np.int32)
    if audio is not None:
        if len(audio) != n:
            raise ValueError(f'{len(audio)} clips for {n} images')
        for i, clip in enumerate(audio):
            clip = np.asarray(clip, np.float32).reshape(-1)[:samples]
            waves[i, :len(clip)], lengths[i] = clip, max(len(clip), 1)
    return {'waveform': waves, 'length': lengths}


def vqa_eval(config, model, params, mesh, rules, cache: dict) -> dict[str, float]:
    """Greedy answers on every `multitask.eval_sets` set -> {'vqa/<set>/accuracy', 'vqa/accuracy'}; `cache`
    keeps the sets, the tokenizer and the jitted decoder between calls ('vqa_counts': examples per set)."""
    if 'vqa' not in cache:
        tokenizer = get_tokenizer(config.model.text)
        tables = multitask.mixture_tables(config.model.prefix_lm, tokenizer)
        cache['vqa'] = (multitask.eval_sets(config, tables), tokenizer,
                        answer_fn(model, int(config.model.prefix_lm.answer_len)))
    sets, tokenizer, fn = cache['vqa']
    results, seen = {}, []
    for name, data in sets.items():
        inputs = {k: v for k, v in data.items() if k in ('image', 'prompt', 'media', 'waveform', 'length')}
        answers = run_answers(fn, params, inputs, tokenizer, mesh, rules, int(config.eval.batch_size))
        results[f'vqa/{name}/accuracy'] = accuracy(answers, list(data['answer']))
        if not name.startswith('heldout/'):
            seen.append(results[f'vqa/{name}/accuracy'])
    cache['vqa_counts'] = {name: len(data['answer']) for name, data in sets.items()}
    if seen:
        results['vqa/accuracy'] = float(np.mean(seen))
    return results
