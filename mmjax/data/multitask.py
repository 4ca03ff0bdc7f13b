"""The PaLI-style task mixture on the embedded digits and the spoken digits (task 'prefix_lm'): which tasks there
are, the text prefix that names each one, its answer, which media it reads, and the held-out sets it is scored on.

Tasks (name: prefix -> answer, media):
    caption:        'caption en'                               -> 'a handwritten seven'    image
    what_number:    'answer en what number is this?'           -> '7'                      image
    even:           'answer en is it even?'                    -> 'yes' | 'no'             image
    greater:        'answer en is it greater than K?'          -> 'yes' | 'no'             image     (K = 0..9)
    plus:           'answer en what is it plus K?'             -> str(digit + K)           image     (K = 0..9)
    transcribe:     'transcribe'                               -> 'seven'                  audio
    speaker_match:  'does the speaker say the written number?' -> 'yes' | 'no'             image + audio

A training example is (task, K, digit): K is the task's argument (0 for the tasks without one; for speaker_match
it is 1 when the clip says the image's digit, else 0) and digit the image's (for transcribe, the clip's) label.
`config.model.prefix_lm.held_out` lists (task, K, digit) combinations never trained on (K = -1: every K); they are
scored separately on the held-out images. `MixtureTables` holds every (task, K, digit)'s prompt and answer as
token ids (so the mixture can be drawn inside the train step) and the mask of what training may draw.
`eval_sets` builds the evaluation examples: the held-out images (index % 5 == 0) and the held-out voices.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mmjax import config as config_lib
from mmjax.config import BOS_ID, EOT_ID, PAD_ID
from mmjax.data import pipeline, speech_triples
from mmjax.data.digits import CLASS_NAMES

TASK_PROMPTS = {
    'caption': 'caption en',
    'what_number': 'answer en what number is this?',
    'even': 'answer en is it even?',
    'greater': 'answer en is it greater than {k}?',
    'plus': 'answer en what is it plus {k}?',
    'transcribe': 'transcribe',
    'speaker_match': 'does the speaker say the written number?',
}
TASK_NAMES = tuple(TASK_PROMPTS)
TASK_MEDIA = {'caption': ('image',), 'what_number': ('image',), 'even': ('image',), 'greater': ('image',),
              'plus': ('image',), 'transcribe': ('audio',), 'speaker_match': ('image', 'audio')}
AUDIO_TASKS = tuple(t for t, media in TASK_MEDIA.items() if 'audio' in media)
WITH_K = ('greater', 'plus')  # tasks whose prompt carries K = 0..9
NUM_K = 10
NUM_DIGITS = len(CLASS_NAMES)
EVAL_SEED = 0


def prompt(task: str, k: int = 0) -> str:
    """The text prefix of `task` with argument k."""
    return TASK_PROMPTS[task].format(k=k)


def answer(task: str, k: int, digit: int) -> str:
    """The answer to (task, k) about `digit` (for speaker_match: k = 1 when the clip says the digit)."""
    if task == 'caption':
        return f'a handwritten {CLASS_NAMES[digit]}'
    if task == 'what_number':
        return str(digit)
    if task == 'plus':
        return str(digit + k)
    if task == 'transcribe':
        return CLASS_NAMES[digit]
    yes = {'even': digit % 2 == 0, 'greater': digit > k, 'speaker_match': bool(k)}[task]
    return 'yes' if yes else 'no'


def task_ks(task: str) -> tuple[int, ...]:
    """The K a task takes: 0..9 for WITH_K, (0, 1) for speaker_match (no / yes), (0,) otherwise."""
    return tuple(range(NUM_K)) if task in WITH_K else (0, 1) if task == 'speaker_match' else (0,)


def identify_prompt(text: str) -> tuple[str, int] | None:
    """The (task, K) whose prefix is `text` (whitespace and case ignored), or None for an unknown prefix."""
    wanted = ' '.join(text.lower().split())
    for task in TASK_NAMES:
        for k in task_ks(task)[:NUM_K if task in WITH_K else 1]:
            if prompt(task, k) == wanted:
                return task, k
    return None


@dataclasses.dataclass(frozen=True)
class MixtureTables:
    """Every training example the mixture can draw, as token ids; T = len(TASK_NAMES), K = NUM_K, D = 10.

    prompts int32 [T,K,Lp]: the prefix ids, right-padded with PAD; answers int32 [T,K,D,La]: answer ids, EOT,
    PAD; allowed bool [T,K,D]: what training may draw (a task's own Ks, minus `held_out`); weights float64 [T]:
    the mixture weights (0 for tasks not trained); media float32 [T,2]: whether the task reads (image, audio).
    """
    prompts: np.ndarray
    answers: np.ndarray
    allowed: np.ndarray
    weights: np.ndarray
    media: np.ndarray


def encode_padded(tokenizer, text: str, length: int, what: str, eot: bool = False) -> np.ndarray:
    """Content ids of `text` (+ EOT) right-padded to `length`: int32 [length]; ValueError naming `what` when
    they do not fit."""
    ids = tokenizer.text_to_ids(text) + ([EOT_ID] if eot else [])
    if len(ids) > length:
        raise ValueError(f'the {what} {text!r} is {len(ids)} tokens, longer than the {length} the model reserves '
                         f'(model.prefix_lm.{"answer_len" if eot else "prompt_len"})')
    return np.asarray(ids + [PAD_ID] * (length - len(ids)), np.int32)


def held_out_mask(held_out) -> np.ndarray:
    """bool [T,K,D]: True at the (task, K, digit) combinations of `held_out` ((task, K, digit), K = -1: all)."""
    mask = np.zeros((len(TASK_NAMES), NUM_K, NUM_DIGITS), bool)
    for task, k, digit in held_out:
        mask[TASK_NAMES.index(task), slice(None) if int(k) < 0 else int(k), int(digit)] = True
    return mask


def mixture_tables(pl_config, tokenizer) -> MixtureTables:
    """The tables of `config.model.prefix_lm` (prompt_len, answer_len, tasks, held_out) with `tokenizer`."""
    t_count, lp, la = len(TASK_NAMES), int(pl_config.prompt_len), int(pl_config.answer_len)
    prompts = np.zeros((t_count, NUM_K, lp), np.int32)
    answers = np.zeros((t_count, NUM_K, NUM_DIGITS, la), np.int32)
    possible = np.zeros((t_count, NUM_K, NUM_DIGITS), bool)
    for t, task in enumerate(TASK_NAMES):
        for k in task_ks(task):
            prompts[t, k] = encode_padded(tokenizer, prompt(task, k), lp, 'prompt')
            possible[t, k] = True
            for d in range(NUM_DIGITS):
                answers[t, k, d] = encode_padded(tokenizer, answer(task, k, d), la, 'answer', eot=True)
    weights = np.zeros(t_count)
    for task, weight in pl_config.tasks:
        weights[TASK_NAMES.index(task)] = float(weight)
    media = np.array([[m in TASK_MEDIA[t] for m in ('image', 'audio')] for t in TASK_NAMES], np.float32)
    return MixtureTables(prompts, answers, possible & ~held_out_mask(pl_config.held_out), weights, media)


def sequence(prompt_ids: np.ndarray, answer_ids: np.ndarray, num_media: int) -> np.ndarray:
    """The decoder's token sequence: `num_media` media slots (PAD ids, the media embeddings are added there),
    the prompt [..., Lp], BOS, the answer [..., La] -> int32 [..., num_media + Lp + 1 + La]."""
    lead = prompt_ids.shape[:-1]
    return np.concatenate([np.full(lead + (num_media,), PAD_ID, np.int32), prompt_ids,
                           np.full(lead + (1,), BOS_ID, np.int32), answer_ids], axis=-1).astype(np.int32)


def _k_choices(allowed: np.ndarray, t: int, digit: int, rng: np.random.Generator) -> int:
    ks = np.flatnonzero(allowed[t, :, digit])
    return int(rng.choice(ks))


def eval_sets(config, tables: MixtureTables) -> dict[str, dict[str, np.ndarray]]:
    """Evaluation examples per task, on the held-out images (index % 5 == 0) and, with an audio tower, the
    held-out voices (`speech_triples.HELD_OUT_VOICES`). Name 'heldout/<task>' for the held-out (task, K, digit)
    combinations. Each: {'image' [N,H,W,C], 'waveform' [N,S], 'length' [N], 'prompt' int32 [N,Lp], 'answer' str
    [N], 'digit' int32 [N], 'k' int32 [N], 'media' float32 [N,2] (reads image, clip)}; zeros where the task reads
    no image / no clip."""
    test = pipeline.load_eval_split(config, 'test')
    audio = 'audio' in config_lib.model_towers(config)
    clips = speech_triples.eval_clips(config, config_lib.data_dir(config)) if audio else None
    held = held_out_mask(config.model.prefix_lm.held_out)
    rng, sets = np.random.default_rng(EVAL_SEED), {}
    for t, task in enumerate(TASK_NAMES):
        if tables.weights[t] <= 0 or (task in AUDIO_TASKS and not audio):
            continue
        rows = _task_rows(task, t, test['label'], clips, tables.allowed, held, rng)
        for name, picked in rows.items():
            if picked:
                sets[name] = _examples(task, t, picked, test, clips, tables)
    return sets


def _task_rows(task, t, labels, clips, allowed, held, rng) -> dict[str, list[tuple[int, int, int]]]:
    """(image index, clip index, K) rows of `task`'s evaluation: trained combinations, and 'heldout/<task>'."""
    rows: dict[str, list[tuple[int, int, int]]] = {task: [], f'heldout/{task}': []}
    if task == 'transcribe':
        rows[task] = [(0, c, 0) for c in range(len(clips['label']))]
        return rows
    for i, digit in enumerate(labels):
        digit = int(digit)
        clip = 0
        if task == 'speaker_match':
            match = bool(rng.random() < 0.5)
            pool = np.flatnonzero((clips['label'] == digit) == match)
            clip = int(rng.choice(pool))
            rows[task if allowed[t, int(match), digit] else f'heldout/{task}'].append((i, clip, int(match)))
            continue
        if allowed[t, :, digit].any():
            rows[task].append((i, clip, _k_choices(allowed, t, digit, rng)))
        rows[f'heldout/{task}'] += [(i, clip, int(k)) for k in np.flatnonzero(held[t, :, digit])
                                    if k in task_ks(task)]
    return rows


def _examples(task, t, picked, test, clips, tables: MixtureTables) -> dict[str, np.ndarray]:
    image_ix, clip_ix, ks = (np.array(c, np.int64) for c in zip(*picked))
    n = len(picked)
    digits = clips['label'][clip_ix] if task == 'transcribe' else test['label'][image_ix]
    out = {'image': test['image'][image_ix] * tables.media[t, 0], 'media': np.repeat(tables.media[t:t + 1], n, 0),
           'prompt': tables.prompts[t, ks], 'k': ks.astype(np.int32), 'digit': digits.astype(np.int32),
           'answer': np.array([answer(task, int(k), int(d)) for k, d in zip(ks, digits)])}
    if clips is not None:
        out['waveform'] = clips['waveform'][clip_ix] * tables.media[t, 1]
        out['length'] = np.where(tables.media[t, 1] > 0, clips['length'][clip_ix], 1).astype(np.int32)
    return out
