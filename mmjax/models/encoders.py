"""Modality encoders. Each maps its input to `(tokens [B,N,width], pooled [B,width])`.

`EncoderOptions` holds the options every tower shares (ViT, TextTransformer here, `audio.AudioTransformer`);
`embed_text` is the text input (embeddings, positions, attention mask, pooled index) of both text encoders
(TextTransformer and `fusion.GatedXAttnTextEncoder`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.config import PAD_ID
from mmjax.models.layers import ACT_POOLED, ACT_TOKENS, Embed, add_positions, constrain, dense, layer_norm, partitioned
from mmjax.models.transformer import Encoder, pooled_token_features, take_rows

Dtype = Any


# Rows of the text embedding table are rounded up to a multiple of this (the vocab axis shards evenly).
VOCAB_MULTIPLE = 128


class EncoderOptions(nn.Module):
    """The options every modality tower shares, declared once: keyword-only fields with these defaults, which
    `ViT`, `TextTransformer` and `AudioTransformer` inherit (each declares its own shape fields, among them
    `width`, `depth`, `num_heads` and `mlp_dim`, which `encoder_stack` reads).

    remat / scan_layers / activation / dtype / param_dtype: see `transformer.Encoder` (`scan_layers` is its
    `scan`). Fine-tuning fields (off by default, leaving the parameter tree unchanged; see
    `mmjax.training.finetune`): `num_prompts` P > 0 adds P learned tokens 'prompts' [P, width] ('length', 'embed')
    (where depends on the tower); `adapter_dim` / `lora_*` go to every encoder block (`transformer.EncoderBlock`).
    """
    _: dataclasses.KW_ONLY
    remat: str = 'none'
    scan_layers: bool = False
    activation: str = 'gelu'
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    num_prompts: int = 0
    adapter_dim: int = 0
    lora_rank: int = 0
    lora_alpha: float = 1.0
    lora_targets: str = ''

    def encoder_stack(self) -> Encoder:
        """The tower's `Encoder` 'transformer' with these options (call from the tower's compact `__call__`)."""
        return Encoder(self.depth, self.num_heads, self.mlp_dim, remat=self.remat, scan=self.scan_layers,
                       activation=self.activation, dtype=self.dtype, param_dtype=self.param_dtype,
                       adapter_dim=self.adapter_dim, lora_rank=self.lora_rank, lora_alpha=self.lora_alpha,
                       lora_targets=self.lora_targets, name='transformer')

    def prompt_tokens(self, batch: int) -> jax.Array:
        """The learned prompts, param 'prompts' [P, width] ('length', 'embed') initialised N(0, 0.02),
        broadcast to [batch, P, width] in `dtype`."""
        prompts = self.param('prompts', partitioned(nn.initializers.normal(0.02), ('length', 'embed')),
                             (self.num_prompts, self.width), self.param_dtype)
        return jnp.broadcast_to(prompts.astype(self.dtype)[None], (batch, self.num_prompts, self.width))


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """[B,H,W,C] -> [B,(H/p)*(W/p),p*p*C], patches in row-major order, each flattened as (py, px, c)."""
    b, h, w, c = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f'image size {h}x{w} is not divisible by patch_size {p}')
    x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


class ViT(EncoderOptions):
    """Vision transformer: patch embedding (reshape + Dense), learned positions, pre-LN encoder, final LN.

    pool='cls' prepends a class token (N = num_patches + 1, pooled = token 0);
    pool='mean' averages the patch tokens (N = num_patches).
    Shared options and fine-tuning fields: `EncoderOptions` (keyword-only). `num_prompts` P > 0 inserts P learned
    tokens 'prompts' after the class token (before the patches), without position embeddings; they are dropped
    from the returned tokens and from mean pooling.
    """
    image_size: int
    patch_size: int
    channels: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    pool: str = 'cls'

    @nn.compact
    def __call__(self, images: jax.Array, return_tokens: bool = True) -> tuple[jax.Array | None, jax.Array]:
        """images float [B,H,W,C] -> (tokens [B,N,width], pooled [B,width]) in `dtype`.

        return_tokens=False: (None, pooled); with pool='cls' the last block then computes the class token
        only (`mmjax.models.transformer.Encoder` query_index), the same pooled features for less work.
        """
        if self.pool not in ('cls', 'mean'):
            raise ValueError(f"model.image.pool must be 'cls' or 'mean'; got {self.pool!r}")
        if images.shape[1:] != (self.image_size, self.image_size, self.channels):
            raise ValueError(f'expected images [B,{self.image_size},{self.image_size},{self.channels}], '
                             f'got {images.shape}')
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        patches = patchify(images.astype(self.dtype), self.patch_size)
        x = dense(self.width, ('patch', 'embed'), name='patch_embed', **kw)(patches)
        n = x.shape[1]
        if self.pool == 'cls':
            cls = self.param('cls', partitioned(nn.initializers.normal(0.02), ('embed',)),
                             (self.width,), self.param_dtype)
            cls = jnp.broadcast_to(cls.astype(self.dtype), (x.shape[0], 1, self.width))
            x = jnp.concatenate([cls, x], axis=1)
            n += 1
        pos = self.param('pos_embed', partitioned(nn.initializers.normal(0.02), ('length', 'embed')),
                         (n, self.width), self.param_dtype)
        x = add_positions(x, pos.astype(self.dtype))
        first = 1 if self.pool == 'cls' else 0  # prompts go after the class token
        if self.num_prompts > 0:
            x = jnp.concatenate([x[:, :first], self.prompt_tokens(x.shape[0]), x[:, first:]], axis=1)
        x = layer_norm(name='ln_pre', **kw)(x)
        encoder = self.encoder_stack()
        if not return_tokens and self.pool == 'cls':
            return None, pooled_token_features(encoder, x, None, jnp.zeros((x.shape[0],), jnp.int32), **kw)
        x = encoder(x)
        if self.num_prompts > 0:
            x = jnp.concatenate([x[:, :first], x[:, first + self.num_prompts:]], axis=1)
        x = constrain(layer_norm(name='ln_final', **kw)(x), ACT_TOKENS)
        pooled = x[:, 0] if self.pool == 'cls' else x.mean(axis=1)
        return (x if return_tokens else None), constrain(pooled, ACT_POOLED)


def last_nonpad_index(tokens: jax.Array, pad_id: int = PAD_ID) -> jax.Array:
    """tokens int [B,L] -> int32 [B]: index of the last token != pad_id (0 for an all-pad row)."""
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)
    return jnp.max(jnp.where(tokens != pad_id, positions[None], 0), axis=1)


def embed_text(module: nn.Module, tokens: jax.Array, valid: jax.Array | None,
               num_prompts: int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The input of a text encoder `module` (fields vocab_size, vocab_multiple, max_len, width, causal, pool,
    dtype, param_dtype; call from its compact `__call__`): token embeddings 'token_embed' plus learned positions
    'pos_embed' [max_len, width] ('length', 'embed', initialised N(0, 0.01)), with `num_prompts` P > 0 learned
    prompts prepended (`EncoderOptions.prompt_tokens`; no positions, always valid keys).

    tokens int32 [B,L] (L <= max_len), valid bool [B,L] | None (default tokens != PAD_ID) ->
    (x [B,P+L,width] in `dtype`, attention mask bool [B,1,P+L|1,P+L] (key padding, and causal when
    `module.causal`), pooled index int32 [B] into the L text tokens: 0 for pool='cls', the last valid token
    for pool='eot').
    """
    if module.pool not in ('eot', 'cls'):
        raise ValueError(f"model.text.pool must be 'eot' or 'cls'; got {module.pool!r}")
    length = tokens.shape[1]
    if length > module.max_len:
        raise ValueError(f'text length {length} exceeds model.text.max_len {module.max_len}')
    valid = tokens != PAD_ID if valid is None else valid
    rows = -(-module.vocab_size // module.vocab_multiple) * module.vocab_multiple
    x = Embed(rows, module.width, std=0.02, dtype=module.dtype, param_dtype=module.param_dtype,
              name='token_embed')(tokens)
    pos = module.param('pos_embed', partitioned(nn.initializers.normal(0.01), ('length', 'embed')),
                       (module.max_len, module.width), module.param_dtype)
    x = add_positions(x, constrain(pos[:length].astype(module.dtype), ('act_length', 'act_embed')))
    keys = valid
    if num_prompts > 0:  # [B,P+L]: prompts first, always valid keys
        x = jnp.concatenate([module.prompt_tokens(x.shape[0]), x], axis=1)
        keys = jnp.concatenate([jnp.ones((valid.shape[0], num_prompts), bool), valid], axis=1)
    mask = keys[:, None, None, :]  # [B,1,1,P+L] keys
    if module.causal:
        n = num_prompts + length
        mask = mask & jnp.tril(jnp.ones((n, n), bool))[None, None]
    if module.pool == 'cls':
        index = jnp.zeros((tokens.shape[0],), jnp.int32)
    else:
        index = last_nonpad_index(jnp.where(valid, 1, PAD_ID))
    return x, mask, index


class TextTransformer(EncoderOptions):
    """Text transformer: token + learned position embeddings, pre-LN encoder, final LN.

    causal=True: causal mask (plus key padding mask); typically pool='eot' (features at the last non-pad token).
    causal=False: key padding mask only; typically pool='cls' (position 0, the BOS token).
    The embedding table has `vocab_size` rounded up to a multiple of `vocab_multiple` rows, so that the 'vocab'
    axis divides evenly over a sharded mesh axis (jax rejects uneven shardings); extra rows are never indexed.
    Shared options and fine-tuning fields: `EncoderOptions` (keyword-only). `num_prompts` P > 0 prepends P learned
    tokens 'prompts' (no position embedding; valid keys, seen by every text token under the causal mask); they
    are dropped from the returned tokens, and 'eot'/'cls' pooling reads the same text token as without them.
    The input (embeddings, mask, pooled index) is `embed_text`, shared with `fusion.GatedXAttnTextEncoder`.
    """
    vocab_size: int
    max_len: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    causal: bool = True
    pool: str = 'eot'
    vocab_multiple: int = VOCAB_MULTIPLE

    @nn.compact
    def __call__(self, tokens: jax.Array, valid: jax.Array | None = None,
                 return_tokens: bool = True) -> tuple[jax.Array | None, jax.Array]:
        """tokens int32 [B,L] (L <= max_len, pad id 0) -> (tokens [B,L,width], pooled [B,width]) in `dtype`.

        `valid` bool [B,L] marks real tokens; default `tokens != 0`. Invalid positions are masked as keys.
        return_tokens=False: (None, pooled), and the last block computes the pooled token only
        (`mmjax.models.transformer.Encoder` query_index), the same pooled features for less work.
        """
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x, mask, index = embed_text(self, tokens, valid, self.num_prompts)
        p = self.num_prompts
        encoder = self.encoder_stack()
        if not return_tokens:  # the pooled token only, at its position after the prompts
            return None, pooled_token_features(encoder, x, mask, index + p, **kw)
        x = constrain(layer_norm(name='ln_final', **kw)(encoder(x, mask)[:, p:]), ACT_TOKENS)  # prompts dropped
        return x, constrain(take_rows(x, index)[:, 0], ACT_POOLED)
