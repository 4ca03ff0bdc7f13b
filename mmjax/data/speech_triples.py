"""(image, caption, speech) triples: the embedded digits, each example with a spoken clip of its digit.

config.data.name = 'digits_speech'. Images, labels, captions and zero-shot prompts are the digits' (this
module re-exports `mmjax.data.digits`' dataset interface, so the image pipeline and image evaluators work
unchanged); `add_speech` adds to every example of the global stream
    'audio': {'waveform': float32 [T], 'length': int32 []},  T = model.audio.max_frames * model.audio.hop - 1
a clip of the example's digit from `mmjax.data.speech` (espeak-ng, 24 voices x 3 rates x 2 pitches), drawn with
the example's RNG (keyed by its global stream position, so batches do not depend on the process count),
zero-padded to T samples. With config.data.augment the clip also gets a random gain in [0.6, 1.4] and a random
leading silence of up to 0.1 s (within T).

Split by voice: the voices whose index in `speech.Grid().voices` is 4 mod 5 (`HELD_OUT_VOICES`: en-us+m1,
en-gb-scotland+m3, en-gb-x-rp+f1, en-029+f3; 240 clips) are never used in training; the audio zero-shot
evaluation (`eval_clips`) uses exactly them, so it measures unseen voices. Training draws from the other 20
voices (1,200 clips).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import grain.python as grain
import numpy as np

from mmjax.data import digits, speech
from mmjax.data.digits import CLASS_NAMES, PROMPT_TEMPLATES, caption, data_source  # noqa: F401 (dataset API)

NAME = 'digits_speech'
SAMPLE_RATE = speech.SAMPLE_RATE  # the rate of every clip; config.model.audio.sample_rate must equal it
HELD_OUT_MODULUS = 5
HELD_OUT_VOICES = tuple(v for i, v in enumerate(speech.Grid().voices) if i % HELD_OUT_MODULUS == HELD_OUT_MODULUS - 1)
MAX_LEAD_S = 0.1
GAIN_RANGE = (0.6, 1.4)

__all__ = ['CLASS_NAMES', 'HELD_OUT_VOICES', 'NAME', 'PROMPT_TEMPLATES', 'SAMPLE_RATE', 'SpeechClip', 'add_speech',
           'caption', 'data_source', 'eval_clips', 'num_samples', 'voice_split']
assert digits.CLASS_NAMES == speech.CLASS_NAMES


def voice_split(clips: speech.SpeechDigits, split: str) -> speech.SpeechDigits:
    """'train': clips of the voices not in HELD_OUT_VOICES; 'test': clips of HELD_OUT_VOICES (clip order)."""
    if split not in ('train', 'test'):
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'test'")
    held = np.isin(clips.voices, HELD_OUT_VOICES)
    keep = held if split == 'test' else ~held
    arrays = {f.name: getattr(clips, f.name)[keep] for f in dataclasses.fields(clips) if f.name != 'sample_rate'}
    return speech.SpeechDigits(sample_rate=clips.sample_rate, **arrays)


@functools.lru_cache(maxsize=4)
def _clips(data_dir: str, split: str) -> tuple[speech.SpeechDigits, tuple[np.ndarray, ...]]:
    """The split's clips (synthesised on first use) and, per label, the indices of its clips."""
    clips = voice_split(speech.load(data_dir), split)
    if clips.sample_rate != SAMPLE_RATE:
        raise ValueError(f'the spoken digits under {data_dir} are at {clips.sample_rate} Hz, not {SAMPLE_RATE}')
    by_label = tuple(np.flatnonzero(clips.labels == c) for c in range(len(CLASS_NAMES)))
    if any(len(ix) == 0 for ix in by_label):
        raise ValueError(f'the {split!r} spoken digits lack a clip for some digit')
    return clips, by_label


def num_samples(config) -> int:
    """Samples per padded waveform: the longest the audio tower takes, max_frames * hop - 1."""
    return int(config.model.audio.max_frames) * int(config.model.audio.hop) - 1


@dataclasses.dataclass(frozen=True)
class SpeechClip(grain.RandomMapTransform):
    """element with 'label' -> element plus 'audio': {'waveform' float32 [num_samples], 'length' int32 []}: a
    clip of that digit from `split` drawn with the element's RNG (optionally augmented, see the module doc)."""

    data_dir: str
    split: str
    num_samples: int
    augment: bool

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        clips, by_label = _clips(self.data_dir, self.split)
        index = int(rng.choice(by_label[int(element['label'])]))
        clip = clips.waveforms[index, :clips.lengths[index]].astype(np.float32) / 32768.0
        clip = clip[:self.num_samples]
        lead = 0
        if self.augment:
            clip = clip * np.float32(rng.uniform(*GAIN_RANGE))
            lead = int(rng.integers(0, min(int(MAX_LEAD_S * SAMPLE_RATE), self.num_samples - len(clip)) + 1))
        wave = np.zeros(self.num_samples, np.float32)
        wave[lead:lead + len(clip)] = clip
        return dict(element, audio={'waveform': wave, 'length': np.int32(lead + len(clip))})


def add_speech(config, stream: grain.MapDataset, data_dir: str, split: str = 'train') -> grain.MapDataset:
    """The global stream with a spoken clip per example (RNG keyed by the stream position and config.seed)."""
    seed = int(np.random.SeedSequence([int(config.seed), 0x5BEEC4]).generate_state(1, dtype=np.uint32)[0])
    _clips(data_dir, split)  # synthesise / load now, in the calling process
    transform = SpeechClip(data_dir=data_dir, split=split, num_samples=num_samples(config),
                           augment=bool(config.data.augment))
    return stream.random_map(transform, seed=seed)


def eval_clips(config, data_dir: str, split: str = 'test') -> dict[str, np.ndarray]:
    """Every clip of `split` (default the held-out voices), unaugmented: {'waveform': float32 [N, T],
    'length': int32 [N], 'label': int32 [N]}, T = num_samples(config); longer clips are cut to T."""
    clips, _ = _clips(data_dir, split)
    t = num_samples(config)
    waves = np.zeros((len(clips), t), np.float32)
    n = min(t, clips.waveforms.shape[1])
    waves[:, :n] = clips.waveforms[:, :n].astype(np.float32) / 32768.0
    lengths = np.minimum(clips.lengths, t).astype(np.int32)
    waves[np.arange(t)[None] >= lengths[:, None]] = 0.0
    return {'waveform': waves, 'length': lengths, 'label': clips.labels.astype(np.int32)}
