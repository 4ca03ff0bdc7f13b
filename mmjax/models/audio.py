"""Audio encoder: a spectrogram transformer that takes raw waveforms.

The tower runs the JAX log-mel front end (`mmjax.models.frontend.LogMel`) itself, so users and the input pipeline
hand it 16 kHz (config `sample_rate`) float waveforms and their lengths, never features: there is one place
where the feature settings live (`config.model.audio`), they cannot drift between training and inference, and
the front end runs on the accelerator, batched and sharded like the rest of the model.

Patching: the log-mel image [B, F, n_mels] is padded with silence to a multiple of `patch_time` frames and cut
into non-overlapping patch_time x patch_freq patches (reshape + Dense, like ViT), time-major. A learned position
embedding covers `max_frames` frames; shorter clips use its leading rows. A CLS token is prepended.

Variable length: sample t of clip b is real when t < lengths[b]. Padding samples are zeroed before the front
end and frames from frame 1 + lengths // hop on are set to silence, so frames depend only on real audio; a patch
is a valid attention key when its first frame is real. Tokens at invalid patches are returned as zeros, so
neither the padding's content nor its length changes the outputs.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.encoders import EncoderOptions
from mmjax.models.frontend import LogMel
from mmjax.models.layers import ACT_POOLED, ACT_TOKENS, add_positions, constrain, dense, layer_norm, partitioned
from mmjax.models.transformer import pooled_token_features


def patchify_spectrogram(x: jax.Array, patch_time: int, patch_freq: int) -> jax.Array:
    """[B, F, M] (F % patch_time == 0, M % patch_freq == 0) -> [B, (F/pt)*(M/pf), pt*pf], time-major,
    each patch flattened as (frame, mel)."""
    b, f, m = x.shape
    if f % patch_time or m % patch_freq:
        raise ValueError(f'spectrogram {f}x{m} is not divisible by patches {patch_time}x{patch_freq}')
    x = x.reshape(b, f // patch_time, patch_time, m // patch_freq, patch_freq).transpose(0, 1, 3, 2, 4)
    return x.reshape(b, (f // patch_time) * (m // patch_freq), patch_time * patch_freq)


class AudioTransformer(EncoderOptions):
    """Waveform -> log-mel -> patch embedding, learned positions, CLS, pre-LN encoder, final LN.

    Log-mel dB values are standardised with the fixed `input_mean` / `input_std` (defaults measured on the
    spoken-numbers set, whose real frames have mean -37 dB, std 22 dB, range [-100, 13] dB).
    pool='cls': pooled = CLS token; pool='mean': mean over the valid patch tokens.
    Shared options and fine-tuning fields: `mmjax.models.encoders.EncoderOptions` (keyword-only). As in ViT,
    `num_prompts` P > 0 inserts P learned tokens after the class token (no position embeddings; always attended
    to, dropped from the returned tokens and from mean pooling).
    """
    sample_rate: int
    n_fft: int
    hop: int
    n_mels: int
    max_frames: int
    patch_time: int
    patch_freq: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    pool: str = 'cls'
    mel_scale: str = 'slaney'
    f_min: float = 0.0
    f_max: float | None = None
    input_mean: float = -37.0
    input_std: float = 22.0

    @property
    def frontend(self) -> LogMel:
        return LogMel(sample_rate=self.sample_rate, n_fft=self.n_fft, hop=self.hop, n_mels=self.n_mels,
                      f_min=self.f_min, f_max=self.f_max, mel_scale=self.mel_scale)

    @property
    def max_samples(self) -> int:
        """The longest waveform accepted: its frame count 1 + T // hop is at most max_frames."""
        return self.max_frames * self.hop - 1

    def features(self, waveform: jax.Array, lengths: jax.Array) -> tuple[jax.Array, jax.Array]:
        """waveform [B, T], lengths int [B] -> (standardised log-mel float32 [B, F', n_mels] with F' = frames
        rounded up to a multiple of patch_time, bool patch mask [B, F' / patch_time])."""
        frontend = self.frontend
        t = waveform.shape[1]
        waveform = jnp.where(jnp.arange(t)[None] < lengths[:, None], waveform.astype(jnp.float32), 0.0)
        waveform = constrain(waveform, ('act_batch', None))
        log_mel = frontend(waveform, self.sample_rate)
        silence = frontend.log(jnp.zeros((), jnp.float32))
        frames = log_mel.shape[1]
        padded_frames = -(-frames // self.patch_time) * self.patch_time
        log_mel = jnp.pad(log_mel, ((0, 0), (0, padded_frames - frames), (0, 0)), constant_values=silence)
        valid_frames = frontend.num_frames(lengths)[:, None]  # [B, 1]
        frame_index = jnp.arange(padded_frames)[None]
        log_mel = jnp.where((frame_index < valid_frames)[..., None], log_mel, silence)
        log_mel = constrain((log_mel - self.input_mean) / self.input_std, ('act_batch', None, None))
        patch_mask = jnp.arange(0, padded_frames, self.patch_time)[None] < valid_frames
        return log_mel, patch_mask

    @nn.compact
    def __call__(self, audio: jax.Array | Mapping[str, jax.Array], lengths: jax.Array | None = None,
                 return_tokens: bool = True) -> tuple[jax.Array | None, jax.Array]:
        """audio: float waveform [B, T] at `sample_rate` (T <= max_samples), or {'waveform': [B, T],
        'length': int [B]}; lengths int [B] = real samples per clip (default T).
        -> (tokens [B, 1 + N, width] with N = ceil(frames / patch_time) * (n_mels / patch_freq), frames =
        1 + T // hop, tokens at padded patches zero; pooled [B, width]) in `dtype`.
        return_tokens=False: (None, pooled); with pool='cls' the last block then computes the class token only
        (`mmjax.models.transformer.Encoder` query_index)."""
        if isinstance(audio, Mapping):
            if lengths is not None:
                raise ValueError('pass lengths either in the audio dict or as an argument, not both')
            audio, lengths = audio['waveform'], audio.get('length')
        if self.pool not in ('cls', 'mean'):
            raise ValueError(f"model.audio.pool must be 'cls' or 'mean'; got {self.pool!r}")
        if self.n_mels % self.patch_freq:
            raise ValueError(f'model.audio.n_mels {self.n_mels} is not divisible by patch_freq {self.patch_freq}')
        if audio.ndim != 2:
            raise ValueError(f'expected waveforms [B, T]; got shape {audio.shape}')
        b, t = audio.shape
        if t > self.max_samples:
            raise ValueError(f'waveforms of {t} samples give {self.frontend.num_frames(t)} frames, more than '
                             f'model.audio.max_frames {self.max_frames} (at most {self.max_samples} samples)')
        lengths = jnp.full((b,), t, jnp.int32) if lengths is None else jnp.minimum(lengths.astype(jnp.int32), t)

        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        log_mel, patch_mask = self.features(audio, lengths)
        patches = patchify_spectrogram(log_mel.astype(self.dtype), self.patch_time, self.patch_freq)
        x = dense(self.width, ('patch', 'embed'), name='patch_embed', **kw)(patches)
        n_freq = self.n_mels // self.patch_freq
        token_mask = jnp.repeat(patch_mask, n_freq, axis=1)  # [B, N], time-major like the patches
        cls = self.param('cls', partitioned(nn.initializers.normal(0.02), ('embed',)), (self.width,),
                         self.param_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, self.width)), x], axis=1)
        max_tokens = 1 + -(-self.max_frames // self.patch_time) * n_freq
        pos = self.param('pos_embed', partitioned(nn.initializers.normal(0.02), ('length', 'embed')),
                         (max_tokens, self.width), self.param_dtype)
        x = add_positions(x, constrain(pos[:x.shape[1]].astype(self.dtype), ('act_length', 'act_embed')))
        valid = jnp.concatenate([jnp.ones((b, 1), bool), token_mask], axis=1)  # [B, 1 + N]
        p = self.num_prompts
        attend = valid  # keys the encoder may attend to: [B, 1 + P + N] with prompts
        if p > 0:
            x = jnp.concatenate([x[:, :1], self.prompt_tokens(b), x[:, 1:]], axis=1)
            attend = jnp.concatenate([valid[:, :1], jnp.ones((b, p), bool), valid[:, 1:]], axis=1)
        x = layer_norm(name='ln_pre', **kw)(x)

        encoder = self.encoder_stack()
        if not return_tokens and self.pool == 'cls':
            return None, pooled_token_features(encoder, x, attend[:, None, None, :], jnp.zeros((b,), jnp.int32),
                                               **kw)
        x = encoder(x, attend[:, None, None, :])
        if p > 0:
            x = jnp.concatenate([x[:, :1], x[:, 1 + p:]], axis=1)
        x = layer_norm(name='ln_final', **kw)(x)
        x = constrain(jnp.where(valid[..., None], x, jnp.zeros((), x.dtype)), ACT_TOKENS)
        if self.pool == 'cls':
            pooled = x[:, 0]
        else:
            count = jnp.maximum(token_mask.sum(axis=1, keepdims=True), 1).astype(x.dtype)
            pooled = x[:, 1:].sum(axis=1) / count
        return (x if return_tokens else None), constrain(pooled, ACT_POOLED)
