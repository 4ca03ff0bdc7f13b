"""NumPy helpers that get audio into the model: resampling and padding waveforms to a batch (the log-mel front end
itself is a model layer, `mmjax.models.frontend.LogMel`)."""


from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from mmjax.config.validation import check_sample_rate


def resample(waveform: np.ndarray, orig_rate: int, target_rate: int) -> np.ndarray:
    """Polyphase resampling (scipy.signal.resample_poly, Kaiser window) of float [..., T] along the last axis."""
    if int(orig_rate) == int(target_rate):
        return np.asarray(waveform, np.float32)
    from scipy.signal import resample_poly  # scipy ships with scikit-learn, a core dependency
    g = math.gcd(int(orig_rate), int(target_rate))
    return resample_poly(np.asarray(waveform, np.float64), int(target_rate) // g, int(orig_rate) // g,
                         axis=-1).astype(np.float32)


def pad_batch(waveforms: Sequence[np.ndarray], sample_rate: int, expected_rate: int,
              length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """1-D waveforms at `sample_rate` (checked against `expected_rate`) -> (float32 [B, T] zero-padded,
    int32 [B] lengths). T = `length` (clips longer than it are an error) or the longest clip."""
    check_sample_rate(sample_rate, expected_rate)
    clips = [np.asarray(w, np.float32) for w in waveforms]
    for i, clip in enumerate(clips):
        if clip.ndim != 1:
            raise ValueError(f'waveform {i} must be 1-D (mono); got shape {clip.shape}')
    longest = max((len(c) for c in clips), default=0)
    total = longest if length is None else int(length)
    if longest > total:
        raise ValueError(f'a clip has {longest} samples, more than the batch length {total}')
    out = np.zeros((len(clips), total), np.float32)
    for i, clip in enumerate(clips):
        out[i, :len(clip)] = clip
    return out, np.array([len(c) for c in clips], np.int32)
