"""DALL·E-style text-to-image: one `TextDecoder` over the caption then the image's VQ codes, prefix-LM over the
caption (its T token slots see each other both ways) and causal over the codes, plus the frozen VQ tokenizer.

Sequence and vocabulary. The decoder's vocabulary is the text tokenizer's V_t ids followed by the K image codes
(code c is token V_t + c). A training row is [caption (T slots, right-padded), codes 0..N-2] (N = codes per
image, the tokenizer's grid h*w in raster order); the logits after slot T-1+j predict code j, so the loss reads
the N positions T-1 .. T+N-2 and only their K image columns (`image_logits`). A caption blanked for
classifier-free guidance is all `PAD_ID`.

Parameters: 'generator' (the `TextDecoder`), and the tokenizer under the names a task 'vq' workdir uses
('encoder', 'quantizer', 'decoder' of `mmjax.models.vq`), so `init_from` loads them and `optim.freeze_rules`
freeze them; the tokenizer is saved with every checkpoint, and a generator workdir decodes its own samples.

Sampling (`sample_codes`): `mmjax.models.decoding.sample` with the KV cache, the caption as the prompt;
classifier-free guidance is `guided_logits_fn`, a logits_fn wrapper over a cache of 2B rows (the conditional
rows, then the same rows with the blank caption): logits_uncond + s * (logits_cond - logits_uncond).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.config import PAD_ID
from mmjax.models import decoding
from mmjax.models.decoder import TextDecoder
from mmjax.models.encoders import VOCAB_MULTIPLE
from mmjax.models.vq import VectorQuantizer, VQDecoder, VQEncoder, code_grid

NEVER = -1  # an end-of-sequence id no token has: image sequences always run to N codes


class TextToImageModel(nn.Module):
    """Caption tokens int32 [B,T] + images [B,H,W,C] -> logits of the N image codes [B,N,K].

    text_vocab V_t, text_len T: the text tokenizer's ids and caption slots; image_vocab K: the codebook size;
    image_tokens N: codes per image (grid h*w); vq: the tokenizer's `model.vq` fields (dict); channels: C.
    width / depth / num_heads / mlp_dim / remat / activation / dtype: the generator `TextDecoder`.
    """
    text_vocab: int
    text_len: int
    image_vocab: int
    image_tokens: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    vq: Any
    channels: int
    remat: str = 'none'
    activation: str = 'gelu'
    dtype: Any = jnp.float32

    def generator_fields(self) -> dict[str, Any]:
        """The generator `TextDecoder`'s fields."""
        return dict(vocab_size=self.text_vocab + self.image_vocab, max_len=self.text_len + self.image_tokens,
                    width=self.width, depth=self.depth, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                    vocab_multiple=VOCAB_MULTIPLE, remat=self.remat, activation=self.activation, dtype=self.dtype)

    def generator_module(self) -> TextDecoder:
        """The generator decoder, unbound (`init_cache` needs no parameters)."""
        return TextDecoder(**self.generator_fields(), parent=None)

    def setup(self):
        vq = dict(self.vq)
        widths = tuple(int(w) for w in vq['widths'])
        self.encoder = VQEncoder(widths, int(vq['res_blocks']), int(vq['code_dim']))
        self.quantizer = VectorQuantizer(self.image_vocab, int(vq['code_dim']))
        self.decoder = VQDecoder(widths, int(vq['res_blocks']), self.channels)
        self.generator = TextDecoder(**self.generator_fields())

    def __call__(self, batch: dict[str, jax.Array], train: bool = False) -> dict[str, jax.Array]:
        """batch {'image' [B,H,W,C] normalised, 'text' int32 [B,T]} -> {'logits' float32 [B,N,K] (code j given the
        caption and codes < j), 'codes' int32 [B,N] (the frozen tokenizer's, no gradient)}."""
        del train
        codes = jax.lax.stop_gradient(self.encode(batch['image']))
        if self.is_initializing():  # the tokenizer's decoder is a parameter of the model too
            self.decode(codes)
        codes = codes.reshape(codes.shape[0], -1)
        return {'logits': self.image_logits(batch['text'], codes), 'codes': codes}

    def image_logits(self, text: jax.Array, codes: jax.Array) -> jax.Array:
        """text int32 [B,T], codes int32 [B,N] -> float32 [B,N,K]: the logits of code j after the caption and
        codes 0..j-1 (prefix-LM over the T caption slots; code N-1 is never read)."""
        tokens = jnp.concatenate([text, codes[:, :-1] + self.text_vocab], axis=1)
        prefix = jnp.full((text.shape[0],), text.shape[1], jnp.int32)
        logits = self.generator(tokens, prefix_len=prefix)
        return logits[:, text.shape[1] - 1:, self.text_vocab:self.text_vocab + self.image_vocab]

    def step(self, tokens: jax.Array, positions: jax.Array, cache) -> tuple[jax.Array, Any]:
        """The cached decoder call of `decoding` (see `TextDecoder.__call__`): logits over the whole vocabulary."""
        return self.generator(tokens, positions, cache)

    def encode(self, images: jax.Array) -> jax.Array:
        """images [B,H,W,C] (normalised) -> codes int32 [B,h,w]."""
        return self.quantizer(self.encoder(images))['codes']

    def decode(self, codes: jax.Array) -> jax.Array:
        """codes int [B,h,w] -> images [B,H,W,C] (normalised)."""
        return self.decoder(self.quantizer.lookup(codes))


def image_columns_only(logits: jax.Array, text_vocab: int, image_vocab: int) -> jax.Array:
    """logits [..., Vr] -> float32 [..., Vr] with every column but the image codes' at -inf."""
    column = jnp.arange(logits.shape[-1])
    keep = (column >= text_vocab) & (column < text_vocab + image_vocab)
    return jnp.where(keep, logits.astype(jnp.float32), -jnp.inf)


def guided_logits_fn(logits_fn: decoding.LogitsFn, scale: float, blank_prompt: jax.Array) -> decoding.LogitsFn:
    """Classifier-free guidance around `logits_fn` for a cache of 2B rows (rows B.. are the unconditional ones):
    the wrapped function takes B rows of tokens/positions like any logits_fn, runs concat([tokens, tokens]) (at
    the prompt pass, L = prompt length, the second half gets `blank_prompt` [B,T] instead) in one call and
    returns u + scale * (c - u) of the two halves' logits (scale 1: the conditional, 0: the unconditional)."""
    def fn(params, tokens, cache, position):
        second = blank_prompt if tokens.shape[1] == blank_prompt.shape[1] and tokens.shape[1] > 1 else tokens
        logits, cache = logits_fn(params, jnp.concatenate([tokens, second]), cache,
                                  jnp.concatenate([position, position]))
        cond, uncond = jnp.split(logits.astype(jnp.float32), 2)
        return uncond + scale * (cond - uncond), cache
    return fn


def model_logits_fn(model: TextToImageModel, guidance: float = 1.0,
                    blank_prompt: jax.Array | None = None) -> decoding.LogitsFn:
    """`logits_fn(variables, tokens, cache, position)` of `model.step` (with a `blank_prompt`: `guided_logits_fn`
    at scale `guidance`, a cache of 2B rows), logits restricted to the image codes after the guidance (finite
    before it: no -inf - -inf)."""
    def raw(variables, tokens, cache, position):
        return model.apply(variables, tokens, position, cache, method='step')

    inner = raw if blank_prompt is None else guided_logits_fn(raw, guidance, blank_prompt)

    def fn(variables, tokens, cache, position):
        logits, cache = inner(variables, tokens, cache, position)
        return image_columns_only(logits, model.text_vocab, model.image_vocab), cache
    return fn


def sample_codes(model: TextToImageModel, params, text: jax.Array, key: jax.Array, *, guidance: float = 1.0,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Captions int32 [B,T] -> sampled codes int32 [B,N] (KV-cached; guidance != 1: classifier-free guidance over
    2B cache rows). Jit it with the options static; the same key draws the same codes."""
    batch, length = text.shape
    rows = batch if guidance == 1.0 else 2 * batch
    cache = model.generator_module().init_cache(rows, length + model.image_tokens,
                                                prefix_len=jnp.full((rows,), length, jnp.int32))
    fn: Callable = model_logits_fn(model, guidance, None if guidance == 1.0 else jnp.full_like(text, PAD_ID))
    out = decoding.sample(fn, {'params': params}, text, cache, key, max_new_tokens=model.image_tokens,
                          temperature=temperature, top_k=top_k, top_p=top_p,
                          prompt_len=jnp.full((batch,), length, jnp.int32), eos_id=NEVER)
    return jnp.clip(out.tokens - model.text_vocab, 0, model.image_vocab - 1)


def build_text_to_image_model(model_config) -> TextToImageModel:
    """The model of `config.model` (model.text: the caption side, model.vq: the tokenizer, model.text_to_image:
    the generator)."""
    t, v, img = model_config.text_to_image, model_config.vq, model_config.image
    grid = code_grid(model_config)
    return TextToImageModel(
        text_vocab=int(model_config.text.vocab_size), text_len=int(model_config.text.max_len),
        image_vocab=int(t.image_vocab), image_tokens=grid * grid, width=int(t.width), depth=int(t.depth),
        num_heads=int(t.num_heads), mlp_dim=int(t.mlp_dim), vq=dict(v), channels=int(img.channels),
        remat=str(model_config.remat), activation=str(model_config.activation),
        dtype=jnp.dtype(model_config.dtype))
