"""The log-mel spectrogram front end in JAX: a model layer (the audio tower runs it on raw waveforms).

`LogMel` matches `librosa.feature.melspectrogram(y, sr, n_fft, hop_length, window='hann', center=True,
pad_mode='constant', power=2.0, htk=False, norm='slaney')` followed by
`librosa.power_to_db(S, ref=1.0, amin=floor, top_db=None)`:

  1. centre padding: n_fft // 2 zeros on both sides, so frame i is centred on sample i * hop;
     frames = 1 + T // hop;
  2. periodic Hann window (scipy `get_window('hann', n_fft, fftbins=True)`);
  3. real FFT, power |X|^2;
  4. mel filterbank: Slaney mel scale (linear below 1 kHz, logarithmic above) with Slaney area normalisation
     (librosa's default), or the HTK scale (`mel_scale='htk'`);
  5. 10 * log10(max(mel_power, floor)) in dB (floor 1e-10 -> -100 dB for silence).

Everything is jit-able and batched over the leading axis; the filterbank is a NumPy constant built once.
The front end carries its expected `sample_rate`: every entry point that is given a sample rate checks it and
raises ValueError on a mismatch (resample with `resample` first).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.config.validation import check_sample_rate

MEL_SCALES = ('slaney', 'htk')


def hz_to_mel(freqs: np.ndarray, mel_scale: str = 'slaney') -> np.ndarray:
    """Hz -> mel on the Slaney (librosa default) or HTK scale; float64."""
    freqs = np.asarray(freqs, np.float64)
    if mel_scale == 'htk':
        return 2595.0 * np.log10(1.0 + freqs / 700.0)
    f_sp = 200.0 / 3  # Slaney: linear below 1 kHz ...
    min_log_hz, logstep = 1000.0, math.log(6.4) / 27.0  # ... logarithmic above
    mels = freqs / f_sp
    log_region = freqs >= min_log_hz
    return np.where(log_region, min_log_hz / f_sp + np.log(np.maximum(freqs, min_log_hz) / min_log_hz) / logstep,
                    mels)


def mel_to_hz(mels: np.ndarray, mel_scale: str = 'slaney') -> np.ndarray:
    """Inverse of `hz_to_mel`; float64."""
    mels = np.asarray(mels, np.float64)
    if mel_scale == 'htk':
        return 700.0 * (10.0 ** (mels / 2595.0) - 1.0)
    f_sp = 200.0 / 3
    min_log_hz, logstep = 1000.0, math.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp
    return np.where(mels >= min_log_mel, min_log_hz * np.exp(logstep * (mels - min_log_mel)), f_sp * mels)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float = 0.0, f_max: float | None = None,
                   mel_scale: str = 'slaney', slaney_norm: bool = True) -> np.ndarray:
    """Triangular mel filters as float32 [n_fft // 2 + 1, n_mels] (librosa.filters.mel transposed).

    `slaney_norm` scales each filter by 2 / (its bandwidth in Hz) so filters have equal area (librosa norm='slaney').
    """
    if mel_scale not in MEL_SCALES:
        raise ValueError(f'mel_scale must be one of {MEL_SCALES}; got {mel_scale!r}')
    f_max = sample_rate / 2.0 if f_max is None else float(f_max)
    fft_freqs = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    mel_edges = np.linspace(hz_to_mel(f_min, mel_scale), hz_to_mel(f_max, mel_scale), n_mels + 2)
    hz_edges = mel_to_hz(mel_edges, mel_scale)
    widths = np.diff(hz_edges)
    ramps = hz_edges[:, None] - fft_freqs[None, :]  # [n_mels + 2, n_freqs]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))  # [n_mels, n_freqs]
    if slaney_norm:
        weights *= (2.0 / (hz_edges[2:] - hz_edges[:-2]))[:, None]
    return weights.T.astype(np.float32)


def hann_window(n_fft: int) -> np.ndarray:
    """Periodic Hann window float32 [n_fft] (the FFT-friendly one librosa and scipy use)."""
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n_fft) / n_fft)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class LogMel:
    """Batched log-mel spectrogram: float waveform [B, T] at `sample_rate` -> dB [B, 1 + T // hop, n_mels]."""
    sample_rate: int = 16000
    n_fft: int = 400
    hop: int = 160
    n_mels: int = 64
    f_min: float = 0.0
    f_max: float | None = None
    mel_scale: str = 'slaney'
    floor: float = 1e-10

    def __post_init__(self):
        if self.mel_scale not in MEL_SCALES:
            raise ValueError(f'mel_scale must be one of {MEL_SCALES}; got {self.mel_scale!r}')
        if min(self.sample_rate, self.n_fft, self.hop, self.n_mels) <= 0:
            raise ValueError(f'sample_rate, n_fft, hop and n_mels must be positive; got {self}')
        if self.hop > self.n_fft:
            raise ValueError(f'hop {self.hop} > n_fft {self.n_fft} would skip samples')

    def num_frames(self, num_samples):
        """Frames for `num_samples` samples (int or int array): 1 + num_samples // hop (centred frames)."""
        return 1 + num_samples // self.hop

    def filterbank(self) -> np.ndarray:
        """float32 [n_fft // 2 + 1, n_mels]."""
        return mel_filterbank(self.sample_rate, self.n_fft, self.n_mels, self.f_min, self.f_max, self.mel_scale)

    def frames(self, waveform: jax.Array) -> jax.Array:
        """float [B, T] -> windowed frames float32 [B, 1 + T // hop, n_fft] (zero centre padding)."""
        waveform = jnp.asarray(waveform, jnp.float32)
        if waveform.ndim != 2:
            raise ValueError(f'expected a batch of waveforms [B, T]; got shape {waveform.shape}')
        half = self.n_fft // 2
        padded = jnp.pad(waveform, ((0, 0), (half, half)))
        n = self.num_frames(waveform.shape[1])
        index = np.arange(n)[:, None] * self.hop + np.arange(self.n_fft)[None, :]  # [frames, n_fft]
        return padded[:, index] * hann_window(self.n_fft)

    def power_mel(self, waveform: jax.Array) -> jax.Array:
        """float [B, T] -> mel power float32 [B, frames, n_mels] (no log)."""
        spectrum = jnp.fft.rfft(self.frames(waveform), n=self.n_fft, axis=-1)
        power = jnp.real(spectrum) ** 2 + jnp.imag(spectrum) ** 2
        return jnp.einsum('bfk,km->bfm', power, self.filterbank(), precision=jax.lax.Precision.HIGHEST)

    def __call__(self, waveform: jax.Array, sample_rate: int) -> jax.Array:
        """waveform float [B, T] recorded at `sample_rate` (must equal self.sample_rate) ->
        log-mel dB float32 [B, 1 + T // hop, n_mels]."""
        check_sample_rate(sample_rate, self.sample_rate)
        return self.log(self.power_mel(waveform))

    def log(self, mel_power: jax.Array) -> jax.Array:
        """10 * log10(max(mel_power, floor)) (librosa.power_to_db with ref=1, amin=floor, top_db=None)."""
        return 10.0 * jnp.log10(jnp.maximum(mel_power, self.floor))
