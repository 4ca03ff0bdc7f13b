"""PaLI-style prefix-LM (task 'prefix_lm'): media tokens and a task prefix in, the answer out, one decoder.

    image [B,H,W,C] -> ViT tokens [B,Ni,Wi] -> Dense -> [B,Ni,D]  \\
    audio waveform  -> AudioTransformer tokens [B,Na,Wa] -> Dense  -> media [B,M,D], M = Ni (+ Na)
    decoder sequence [B,S]: M media slots | prompt (Lp ids, right-padded) | BOS | answer ids, EOT, pads

The media slots hold PAD ids whose embeddings (+ positions) get the media tokens added; a task that does not read
a medium gets zeros there (`batch['media']` flags). The decoder is `decoder.TextDecoder` with
prefix_len = M + Lp + 1: the media slots, the prompt and BOS see each other both ways, the answer is causal.
The media reach the decoder as its `prefix_embeddings` (added to the first M input embeddings); decoding uses
`mmjax.models.decoding` with the decoder's KV cache, the media added in the prompt pass only.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.config import BOS_ID, PAD_ID
from mmjax.models import decoding
from mmjax.models.audio import AudioTransformer
from mmjax.models.decoder import TextDecoder
from mmjax.models.encoders import ViT
from mmjax.models.layers import dense
from mmjax.models.model import encoder_kwargs

Kwargs = tuple[tuple[str, Any], ...]


def media_slots(model_cfg) -> tuple[int, int]:
    """(image tokens Ni, audio tokens Na; 0 without an audio tower) of `config.model`: patches + 1 class token
    with pool='cls'."""
    img = model_cfg.image
    image = (img.image_size // img.patch_size) ** 2 + (img.pool == 'cls')
    if 'audio' not in tuple(model_cfg.get('towers', ())):
        return int(image), 0
    a = model_cfg.audio
    return int(image), int((a.max_frames // a.patch_time) * (a.n_mels // a.patch_freq) + (a.pool == 'cls'))


def sequence_length(model_cfg) -> int:
    """Decoder positions a training sequence uses: M + Lp + 1 (BOS) + La."""
    pl = model_cfg.prefix_lm
    return sum(media_slots(model_cfg)) + int(pl.prompt_len) + 1 + int(pl.answer_len)


class PrefixLM(nn.Module):
    """Image (and audio) tower, projections to the decoder width, and the prefix-LM `TextDecoder`.

    image_kwargs / audio_kwargs: the towers' fields (`model.encoder_kwargs`; audio None: no audio tower).
    decoder_kwargs: `TextDecoder` fields. prompt_len Lp, answer_len La: the text slots of a sequence.
    Parameters: 'image', 'image_proj', ('audio', 'audio_proj'), 'decoder'.
    """
    image_kwargs: Kwargs
    audio_kwargs: Kwargs | None
    decoder_kwargs: Kwargs
    prompt_len: int
    answer_len: int

    def setup(self):
        width = dict(self.decoder_kwargs)['width']
        dt = {k: dict(self.decoder_kwargs)[k] for k in ('dtype', 'param_dtype')}
        self.image = ViT(**dict(self.image_kwargs))
        self.image_proj = dense(width, ('joint', 'embed'), **dt)
        if self.audio_kwargs is not None:
            self.audio = AudioTransformer(**dict(self.audio_kwargs))
            self.audio_proj = dense(width, ('joint', 'embed'), **dt)
        self.decoder = TextDecoder(**dict(self.decoder_kwargs))

    def embed_media(self, batch: dict[str, Any]) -> jax.Array:
        """batch 'image' [B,H,W,C], with an audio tower 'audio' ({'waveform' [B,S], 'length' [B]} or [B,S]),
        optional 'media' float [B,2] (use the image, the audio; default both) -> media tokens [B,M,D]."""
        images = batch['image']
        use = batch.get('media', jnp.ones((images.shape[0], 2), jnp.float32))
        tokens, _ = self.image(images)
        parts = [self.image_proj(tokens) * use[:, 0, None, None].astype(tokens.dtype)]
        if self.audio_kwargs is not None:
            audio, _ = self.audio(batch['audio'])
            parts.append(self.audio_proj(audio) * use[:, 1, None, None].astype(audio.dtype))
        return jnp.concatenate(parts, axis=1)

    def __call__(self, batch: dict[str, Any], train: bool = False) -> jax.Array:
        """A full (training) pass: the media of `batch` (see `embed_media`) and batch['tokens'] int32 [B,L]
        (the sequence without its last token; default PAD ids of the training length, for init) -> logits
        float32 [B,L,Vr], position l predicting token l + 1. `train` is accepted for API symmetry."""
        del train
        media = self.embed_media(batch)
        tokens = batch.get('tokens')
        if tokens is None:
            tokens = jnp.full((media.shape[0], media.shape[1] + self.prompt_len + self.answer_len), PAD_ID, jnp.int32)
        prefix = jnp.full((tokens.shape[0],), media.shape[1] + self.prompt_len + 1, jnp.int32)
        return self.decoder(tokens, prefix_len=prefix, prefix_embeddings=media)

    def decode(self, tokens: jax.Array, positions: jax.Array, cache, media: jax.Array | None = None):
        """A cached decoder pass (`TextDecoder`): tokens [B,L] at positions [B]; media [B,M,D] added in the
        prompt pass (None in the steps) -> (logits [B,L,Vr], cache)."""
        return self.decoder(tokens, positions, cache, prefix_embeddings=media)


def build_prefix_lm(model_cfg) -> PrefixLM:
    """`config.model` -> PrefixLM: towers from model.image (and model.audio when 'audio' is in model.towers),
    the decoder from model.prefix_lm (vocabulary model.text.vocab_size)."""
    pl = model_cfg.prefix_lm
    audio = encoder_kwargs(model_cfg, 'audio') if 'audio' in tuple(model_cfg.get('towers', ())) else None
    dtypes = {k: jnp.dtype(model_cfg.get(k, 'float32')) for k in ('dtype', 'param_dtype')}
    decoder = dict(vocab_size=int(model_cfg.text.vocab_size), max_len=int(pl.max_len), width=int(pl.width),
                   depth=int(pl.depth), num_heads=int(pl.num_heads), mlp_dim=int(pl.mlp_dim),
                   remat=model_cfg.remat, activation=model_cfg.activation, **dtypes)
    return PrefixLM(encoder_kwargs(model_cfg, 'image'), audio, tuple(sorted(decoder.items())),
                    int(pl.prompt_len), int(pl.answer_len))


def generate(model: PrefixLM, variables, batch: dict[str, Any], max_new_tokens: int) -> decoding.Generation:
    """Greedy answers: batch's media (see `embed_media`) and batch['prompt'] int32 [B,Lp] (right-padded prefix
    ids) -> `decoding.Generation` with tokens [B,max_new_tokens] (the answer ids, EOT, pads). Traceable."""
    media = model.apply(variables, batch, method=PrefixLM.embed_media)
    b, m = media.shape[:2]
    prompts = jnp.concatenate([jnp.full((b, m), PAD_ID, jnp.int32), batch['prompt'].astype(jnp.int32),
                               jnp.full((b, 1), BOS_ID, jnp.int32)], axis=1)  # media, prompt, BOS
    length = jnp.full((b,), prompts.shape[1], jnp.int32)
    cache = TextDecoder(**dict(model.decoder_kwargs)).init_cache(b, prompts.shape[1] + max_new_tokens,
                                                                 prefix_len=length)

    def logits_fn(v, tokens, cache, position):
        return model.apply(v, tokens, position, cache, media if tokens.shape[1] > 1 else None,
                           method=PrefixLM.decode)

    return decoding.greedy(logits_fn, variables, prompts, cache, max_new_tokens=max_new_tokens, prompt_len=length)
