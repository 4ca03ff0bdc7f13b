"""Flamingo (Alayrac et al. 2022): a frozen causal LM reading images through a perceiver resampler and tanh-gated
cross-attention, prompted with interleaved image-text sequences ('<image> seven.<|endofchunk|><image> two. ...').

  images [B,S,H,W,C] --ViT 'vision' (frozen)--> tokens [B*S,N,Ev] --`PerceiverResampler` 'resampler'-->
  R visual tokens per image --> media [B,S*R,Ev]
  tokens [B,L] --`decoder.TextDecoder` 'lm' (the frozen LM; every k-th block with a tanh-gated cross-attention
  to the media, gates initialised at 0)--> logits [B,L,Vr]

Media-position masking (`media_position_mask`): a token attends only to the image of the last `<image>` token at
or before it (Flamingo's choice: the immediately preceding image, not all earlier ones; earlier images still
reach it through the self-attention to the text that followed them). Tokens before the first `<image>` see no
media and get no cross-attention update. The same rule holds while decoding: generated tokens see the image the
prompt's last token sees (`flamingo_generate`).

The text-only LM (`FlamingoModel` with `cross_attention_every=0`, no vision) has the same 'lm' parameter names,
so a Flamingo run loads it with `init_from` (the gated blocks' 'ln_xattn', 'xattn' and 'xattn_gate' are new).
With every gate at 0 the model computes exactly the LM's logits (`tests/test_flamingo.py`).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.config import EOT_ID, PAD_ID
from mmjax.models import decoding
from mmjax.models.decoder import DecoderCache, TextDecoder
from mmjax.models.encoders import ViT
from mmjax.models.fusion import CrossAttention, MlpResidual
from mmjax.models.layers import ACT_TOKENS, constrain, layer_norm, partitioned

Dtype = Any


class PerceiverResampler(nn.Module):
    """Learned latents cross-attending to vision tokens: x [B,N,E] -> [B,num_latents,E], whatever N.

    Each of `depth` layers: latents + attn(ln(latents), ln(concat(x, latents))) ('xattn_{i}', keys and values
    from the vision tokens and the latents, as in Flamingo), then latents + mlp(ln(latents)) ('mlp_{i}'); a final
    LayerNorm 'ln_final'. The latents 'latents' [num_latents, E] ('length', 'embed') start at N(0, 0.02).
    """
    num_latents: int
    depth: int
    num_heads: int
    mlp_dim: int
    activation: str = 'gelu'
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        latents = self.param('latents', partitioned(nn.initializers.normal(0.02), ('length', 'embed')),
                             (self.num_latents, x.shape[-1]), self.param_dtype)
        lat = jnp.broadcast_to(latents.astype(self.dtype), (x.shape[0],) + latents.shape)
        x = x.astype(self.dtype)
        for i in range(self.depth):
            lat = CrossAttention(self.num_heads, name=f'xattn_{i}', **kw)(lat, jnp.concatenate([x, lat], axis=1))
            lat = MlpResidual(self.mlp_dim, self.activation, name=f'mlp_{i}', **kw)(lat)
        return constrain(layer_norm(name='ln_final', **kw)(lat), ACT_TOKENS)


def media_position_mask(tokens: jax.Array, image_id: int, num_images: int, tokens_per_image: int) -> jax.Array:
    """tokens int [B,L] -> bool [B,L,num_images*tokens_per_image]: token l sees the media tokens of image k-1,
    k = the number of `image_id` tokens in tokens[:l+1] (none when k = 0 or k > num_images). Media token m
    belongs to image m // tokens_per_image."""
    seen = jnp.cumsum(tokens == image_id, axis=1) - 1  # [B,L]: the image each token sees (-1: none)
    owner = jnp.arange(num_images * tokens_per_image, dtype=jnp.int32) // tokens_per_image
    return owner[None, None, :] == seen[:, :, None]


class FlamingoModel(nn.Module):
    """The vision encoder, resampler and LM of the module docstring.

    vision: the ViT (None: the text-only LM, `lm` without cross-attention); resampler: `PerceiverResampler`
    (None with vision None); lm: the `TextDecoder` (cross_attention_every > 0 and cross_attention_gated with
    vision); image_id: the `<image>` token id; max_images S: image slots per sequence.
    """
    lm: TextDecoder
    vision: ViT | None = None
    resampler: PerceiverResampler | None = None
    image_id: int = -1
    max_images: int = 1

    def __call__(self, batch: dict[str, jax.Array]) -> jax.Array:
        """batch {'text': int32 [B,L], 'image': float [B,S,H,W,C] (S image slots; absent for the text-only
        LM)} -> logits float32 [B,L,Vr]: the next-token distribution after each token."""
        tokens = batch['text']
        if self.vision is None:
            return self.lm(tokens)
        images = batch['image']
        media = self.encode_media(images)
        mask = media_position_mask(tokens, self.image_id, images.shape[1], self.resampler.num_latents)
        return self.lm(tokens, media=media, media_mask=mask)

    def encode_media(self, images: jax.Array) -> jax.Array:
        """images float [B,S,H,W,C] -> media [B,S*R,Ev]: R resampled tokens per image, image s at rows s*R..."""
        batch, slots = images.shape[:2]
        tokens, _ = self.vision(images.reshape((batch * slots,) + images.shape[2:]))
        latents = self.resampler(tokens)
        return latents.reshape(batch, slots * latents.shape[1], latents.shape[2])

    def decode(self, tokens: jax.Array, positions: jax.Array, cache: DecoderCache) -> tuple[jax.Array, DecoderCache]:
        """The LM's cached pass (`TextDecoder.__call__` with a cache): tokens [B,L] at positions [B]."""
        return self.lm(tokens, positions, cache)


def build_flamingo_model(model_cfg, image_id: int, text_only: bool = False) -> FlamingoModel:
    """FlamingoModel from `config.model`: the LM from model.text (vocab_size, max_len, width, depth, num_heads,
    mlp_dim), the ViT from model.image, the resampler and the gated blocks from model.flamingo; `text_only`: the
    LM alone, without cross-attention (the pretraining stage)."""
    t, f = model_cfg.text, model_cfg.flamingo
    kw = dict(dtype=jnp.dtype(model_cfg.dtype), param_dtype=jnp.dtype(model_cfg.param_dtype))
    common = dict(remat=model_cfg.remat, activation=model_cfg.activation, **kw)
    lm = TextDecoder(int(t.vocab_size), int(t.max_len), int(t.width), int(t.depth), int(t.num_heads),
                     int(t.mlp_dim), cross_attention_every=0 if text_only else int(f.cross_attention_every),
                     cross_attention_gated=True, **common)
    if text_only:
        return FlamingoModel(lm)
    i = model_cfg.image
    vision = ViT(int(i.image_size), int(i.patch_size), int(i.channels), int(i.width), int(i.depth),
                 int(i.num_heads), int(i.mlp_dim), pool=i.pool, **common)
    resampler = PerceiverResampler(int(f.num_latents), int(f.resampler_depth), int(f.resampler_heads),
                                   int(f.resampler_mlp_dim), activation=model_cfg.activation, **kw)
    return FlamingoModel(lm, vision, resampler, image_id=image_id, max_images=int(f.max_images))


class FlamingoCache(NamedTuple):
    """Decoding state: the LM's cache (its media_mask [B,Lp,M] for the prompt, then [B,1,M]) and step_mask
    bool [B,1,M], what every generated token sees (the prompt's last token's media)."""
    lm: DecoderCache
    step_mask: jax.Array


def flamingo_logits_fn(model: FlamingoModel):
    """`logits_fn(params, tokens, cache: FlamingoCache, position)` for `mmjax.models.decoding`."""
    def logits_fn(params, tokens, cache, position):
        logits, lm_cache = model.apply({'params': params}, tokens, position, cache.lm, method='decode')
        return logits, FlamingoCache(lm_cache._replace(media_mask=cache.step_mask), cache.step_mask)
    return logits_fn


def flamingo_generate(model: FlamingoModel, params, prompts: jax.Array, images: jax.Array, *,
                      max_new_tokens: int, eos_id: int = EOT_ID, pad_id: int = PAD_ID,
                      beam_size: int = 1) -> decoding.Generation:
    """Greedy decoding (beam search with beam_size > 1) after interleaved prompts.

    prompts int32 [B,Lp] right-padded with pad_id (each row's tokens: text and `<image>` tokens), images float
    [B,S,H,W,C] (row b's j-th `<image>` token reads images[b, j]) -> `decoding.Generation` (tokens
    [B,max_new_tokens], or [B,K,max_new_tokens] with beams). Every generated token sees the image of the
    prompt's last `<image>`. Jit it with the options bound (`functools.partial`).
    """
    prompt_len = jnp.maximum(jnp.sum(prompts != pad_id, axis=1), 1).astype(jnp.int32)
    media = model.apply({'params': params}, images, method='encode_media')
    mask = media_position_mask(prompts, model.image_id, images.shape[1], model.resampler.num_latents)
    last = jnp.take_along_axis(mask, (prompt_len - 1)[:, None, None], axis=1)  # [B,1,M]
    lm_cache = model.lm.init_cache(prompts.shape[0], prompts.shape[1] + max_new_tokens, media=media,
                                   media_mask=mask)
    cache = FlamingoCache(lm_cache, last)
    fn = flamingo_logits_fn(model)
    if beam_size > 1:
        out = decoding.beam_search(fn, params, prompts, cache, max_new_tokens=max_new_tokens, beam_size=beam_size,
                                   prompt_len=prompt_len, eos_id=eos_id, pad_id=pad_id)
        return out
    return decoding.greedy(fn, params, prompts, cache, max_new_tokens=max_new_tokens, prompt_len=prompt_len,
                           eos_id=eos_id, pad_id=pad_id)


def jit_generate(model: FlamingoModel, max_new_tokens: int, eos_id: int, beam_size: int = 1):
    """`flamingo_generate` jitted: (params, prompts [B,Lp], images [B,S,H,W,C]) -> Generation."""
    return jax.jit(functools.partial(flamingo_generate, model, max_new_tokens=max_new_tokens, eos_id=eos_id,
                                     beam_size=beam_size))
