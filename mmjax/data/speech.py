"""Spoken numbers: the words "zero".."nine" synthesised offline with espeak-ng, the audio twin of the digits set.

Each word is spoken by every voice (accent x voice variant, e.g. 'en-gb-scotland+f3'), at every speaking rate
(words per minute) and pitch (0..99) of the grid, read from `espeak-ng --stdout` as 16-bit WAV, trimmed of
leading/trailing silence, resampled to `SAMPLE_RATE` (16 kHz) and stored as int16.
Clip order: word, accent, variant, rate, pitch (the last varies fastest); `label` is the word's index in
`CLASS_NAMES`.
Split: a (voice, rate) combination is held out ('test') when (voice_index + rate_index) % 5 == 0, so every
voice and every rate occurs in training while some of their pairings are only heard at test time.

`load(data_dir)` builds the default grid once (about 1,440 clips; espeak-ng must be installed:
`apt-get install -y espeak-ng`) and caches it as a compressed .npz under `data_dir/mmjax_speech_digits/`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
import wave

import numpy as np

from mmjax import config as config_lib
from mmjax import storage
from mmjax.data.audio import resample
from mmjax.data.digits import CLASS_NAMES
from mmjax.data.locking import file_lock

NAME = 'mmjax_speech_digits'
FORMAT_VERSION = 1
SAMPLE_RATE = 16000
# espeak-ng 1.51 ignores '+variant' on 'en-gb' ('en' is the same British voice and honours it) and speaks
# 'en-us-nyc' exactly like 'en-us'; every voice below is distinct (checked by tests/test_audio.py).
ACCENTS = ('en', 'en-us', 'en-gb-scotland', 'en-gb-x-rp', 'en-029', 'en-gb-x-gbclan')
VARIANTS = ('m1', 'm3', 'f1', 'f3')
RATES = (120, 160, 200)
PITCHES = (35, 65)
HOLDOUT_MODULUS = 5
SILENCE_THRESHOLD = 64      # int16 amplitude under which leading/trailing samples count as silence
MARGIN_S = 0.01             # silence kept on either side of the trimmed speech
INSTALL_HINT = 'install it with `apt-get update && apt-get install -y espeak-ng` (Debian/Ubuntu)'


@dataclasses.dataclass(frozen=True)
class Grid:
    """What to synthesise: the words and every (accent, variant, rate, pitch) to speak them with."""
    words: tuple[str, ...] = CLASS_NAMES
    accents: tuple[str, ...] = ACCENTS
    variants: tuple[str, ...] = VARIANTS
    rates: tuple[int, ...] = RATES
    pitches: tuple[int, ...] = PITCHES
    sample_rate: int = SAMPLE_RATE

    @property
    def voices(self) -> tuple[str, ...]:
        """espeak-ng voice names 'accent+variant', accent-major."""
        return tuple(f'{a}+{v}' for a in self.accents for v in self.variants)

    def __len__(self) -> int:
        return len(self.words) * len(self.voices) * len(self.rates) * len(self.pitches)


@dataclasses.dataclass(frozen=True)
class SpeechDigits:
    """N clips. waveforms int16 [N, T] zero-padded (T = longest clip), lengths int32 [N] (samples),
    labels int32 [N], voices str [N], rates int32 [N], pitches int32 [N], test bool [N] (held-out split)."""
    waveforms: np.ndarray
    lengths: np.ndarray
    labels: np.ndarray
    voices: np.ndarray
    rates: np.ndarray
    pitches: np.ndarray
    test: np.ndarray
    sample_rate: int

    def __len__(self) -> int:
        return len(self.labels)

    def split(self, name: str) -> SpeechDigits:
        """The 'train' or 'test' (held-out voice/rate combinations) subset, in clip order."""
        if name not in ('train', 'test'):
            raise ValueError(f"unknown split {name!r}; choose 'train' or 'test'")
        keep = self.test if name == 'test' else ~self.test
        arrays = {f.name: getattr(self, f.name)[keep] for f in dataclasses.fields(self) if f.name != 'sample_rate'}
        return SpeechDigits(sample_rate=self.sample_rate, **arrays)

    def float_waveforms(self) -> np.ndarray:
        """float32 [N, T] in [-1, 1)."""
        return self.waveforms.astype(np.float32) / 32768.0


def espeak_binary() -> str:
    """Path of espeak-ng; RuntimeError with the install step when it is missing."""
    path = shutil.which('espeak-ng')
    if path is None:
        raise RuntimeError(f'espeak-ng is not installed; {INSTALL_HINT}')
    return path


def espeak_version() -> str:
    out = subprocess.run([espeak_binary(), '--version'], capture_output=True, text=True, check=True).stdout
    return out.split('Data at')[0].strip()


def parse_wav(data: bytes) -> tuple[np.ndarray, int]:
    """16-bit mono WAV bytes -> (int16 [T], sample rate). Reads the 'data' chunk to the end of the bytes:
    espeak-ng writing to a pipe cannot seek back to fill in the chunk sizes, so they are placeholders."""
    if data[:4] != b'RIFF' or data[8:12] != b'WAVE':
        raise ValueError('not a RIFF/WAVE stream')
    with wave.open(io.BytesIO(data[:44])) as header:
        rate, width, channels = header.getframerate(), header.getsampwidth(), header.getnchannels()
    if width != 2 or channels != 1:
        raise ValueError(f'expected 16-bit mono WAV, got {8 * width}-bit with {channels} channels')
    start = data.find(b'data', 12)
    if start < 0:
        raise ValueError("WAV stream has no 'data' chunk")
    payload = data[start + 8:]
    return np.frombuffer(payload[:len(payload) // 2 * 2], '<i2').astype(np.int16), rate


def trim_silence(samples: np.ndarray, rate: int) -> np.ndarray:
    """Drops leading/trailing samples quieter than SILENCE_THRESHOLD, keeping MARGIN_S on each side."""
    loud = np.flatnonzero(np.abs(samples.astype(np.int32)) >= SILENCE_THRESHOLD)
    if loud.size == 0:
        return samples[:0]
    margin = int(round(MARGIN_S * rate))
    return samples[max(0, loud[0] - margin):loud[-1] + 1 + margin]


def speak(word: str, voice: str, rate: int, pitch: int, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """One clip: `espeak-ng --stdout -v voice -s rate -p pitch word`, trimmed, at `sample_rate` -> int16 [T]."""
    cmd = [espeak_binary(), '--stdout', '-v', voice, '-s', str(rate), '-p', str(pitch), word]
    result = subprocess.run(cmd, capture_output=True, check=False)
    if result.returncode != 0 or not result.stdout:
        raise RuntimeError(f'{" ".join(cmd)} failed (exit {result.returncode}): '
                           f'{result.stderr.decode(errors="replace").strip()}')
    samples, native_rate = parse_wav(result.stdout)
    samples = trim_silence(samples, native_rate)
    audio = resample(samples.astype(np.float32) / 32768.0, native_rate, sample_rate)
    return np.clip(np.round(audio * 32768.0), -32768, 32767).astype(np.int16)


def synthesize(grid: Grid = Grid(), num_threads: int = 2) -> SpeechDigits:
    """Speaks every clip of `grid` (deterministic: same grid and espeak-ng version -> same arrays)."""
    voices = grid.voices
    jobs = [(label, word, vi, voice, ri, rate, pitch)
            for label, word in enumerate(grid.words)
            for vi, voice in enumerate(voices)
            for ri, rate in enumerate(grid.rates)
            for pitch in grid.pitches]
    with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:  # subprocesses release the GIL
        clips = list(pool.map(lambda job: speak(job[1], job[3], job[5], job[6], grid.sample_rate), jobs))
    lengths = np.array([len(c) for c in clips], np.int32)
    waveforms = np.zeros((len(clips), int(lengths.max(initial=0))), np.int16)
    for i, clip in enumerate(clips):
        waveforms[i, :len(clip)] = clip
    return SpeechDigits(
        waveforms=waveforms, lengths=lengths,
        labels=np.array([j[0] for j in jobs], np.int32),
        voices=np.array([j[3] for j in jobs]),
        rates=np.array([j[5] for j in jobs], np.int32),
        pitches=np.array([j[6] for j in jobs], np.int32),
        test=np.array([(j[2] + j[4]) % HOLDOUT_MODULUS == 0 for j in jobs]),
        sample_rate=grid.sample_rate)


def cache_path(data_dir: str, grid: Grid = Grid()) -> str:
    """The .npz file for `grid` (its name fingerprints the grid, the format and the espeak-ng version)."""
    key = json.dumps([FORMAT_VERSION, espeak_version(), dataclasses.asdict(grid)], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return os.path.join(data_dir, NAME, f'{digest}.npz')


def _read(path: str) -> SpeechDigits:
    with np.load(path) as f:
        arrays = {name: f[name] for name in f.files}
    return SpeechDigits(sample_rate=int(arrays.pop('sample_rate')), **arrays)


def load(data_dir: str | None = None, grid: Grid = Grid(), split: str | None = None) -> SpeechDigits:
    """The spoken-number clips of `grid`, synthesised on first use and cached under `data_dir`
    (default `config_lib.default_data_dir()`); `split` 'train' | 'test' | None (all). Safe for concurrent callers."""
    data_dir = config_lib.default_data_dir() if not data_dir else storage.absolute(data_dir)
    storage.check_local(data_dir, 'data.data_dir', 'the spoken digits are synthesised into a local data_dir')
    path = cache_path(data_dir, grid)
    if not os.path.isfile(path):  # local: checked above
        os.makedirs(os.path.dirname(path), exist_ok=True)  # local
        with file_lock(path + '.lock'):
            if not os.path.isfile(path):  # local
                print(f'mmjax: synthesising {len(grid)} spoken-number clips with espeak-ng into {path} ...',
                      file=sys.stderr, flush=True)
                start = time.perf_counter()
                data = synthesize(grid)
                tmp = path + '.tmp.npz'
                np.savez_compressed(tmp, **{f.name: getattr(data, f.name) for f in dataclasses.fields(data)})
                os.replace(tmp, path)  # local
                print(f'mmjax: spoken numbers ready in {time.perf_counter() - start:.1f}s', file=sys.stderr,
                      flush=True)
    data = _read(path)
    return data if split is None else data.split(split)
