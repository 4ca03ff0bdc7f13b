"""Modality encoders. Each maps its input to `(tokens [B,N,width], pooled [B,width])`."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.layers import (ACT_POOLED, ACT_TOKENS, Embed, Encoder, add_positions, constrain, dense,
                                 layer_norm, partitioned, pooled_token_features)

Dtype = Any
PAD_ID = 0


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """[B,H,W,C] -> [B,(H/p)*(W/p),p*p*C], patches in row-major order, each flattened as (py, px, c)."""
    b, h, w, c = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f'image size {h}x{w} is not divisible by patch_size {p}')
    x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


class ViT(nn.Module):
    """Vision transformer: patch embedding (reshape + Dense), learned positions, pre-LN encoder, final LN.

    pool='cls' prepends a class token (N = num_patches + 1, pooled = token 0);
    pool='mean' averages the patch tokens (N = num_patches).
    Fine-tuning fields (off by default; see `mmjax.finetune`): `num_prompts` P > 0 inserts P learned tokens
    'prompts' [P, width] ('length', 'embed') after the class token (before the patches), without position
    embeddings; they are dropped from the returned tokens and from mean pooling. `adapter_dim` / `lora_*` go
    to every encoder block (`mmjax.models.layers.EncoderBlock`).
    """
    image_size: int
    patch_size: int
    channels: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    pool: str = 'cls'
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

    @nn.compact
    def __call__(self, images: jax.Array, return_tokens: bool = True) -> tuple[jax.Array | None, jax.Array]:
        """images float [B,H,W,C] -> (tokens [B,N,width], pooled [B,width]) in `dtype`.

        return_tokens=False: (None, pooled); with pool='cls' the last block then computes the class token
        only (`mmjax.models.layers.Encoder` query_index), the same pooled features for less work.
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
            x = jnp.concatenate([x[:, :first], prompt_tokens(self, x.shape[0]), x[:, first:]], axis=1)
        x = layer_norm(name='ln_pre', **kw)(x)
        encoder = Encoder(self.depth, self.num_heads, self.mlp_dim, remat=self.remat, scan=self.scan_layers,
                          activation=self.activation, name='transformer', **finetune_kwargs(self), **kw)
        if not return_tokens and self.pool == 'cls':
            return None, pooled_token_features(encoder, x, None, jnp.zeros((x.shape[0],), jnp.int32), **kw)
        x = encoder(x)
        if self.num_prompts > 0:
            x = jnp.concatenate([x[:, :first], x[:, first + self.num_prompts:]], axis=1)
        x = constrain(layer_norm(name='ln_final', **kw)(x), ACT_TOKENS)
        pooled = x[:, 0] if self.pool == 'cls' else x.mean(axis=1)
        return (x if return_tokens else None), constrain(pooled, ACT_POOLED)


def finetune_kwargs(encoder: nn.Module) -> dict[str, Any]:
    """The adapter / LoRA fields of an encoder, for its `Encoder`."""
    return dict(adapter_dim=encoder.adapter_dim, lora_rank=encoder.lora_rank, lora_alpha=encoder.lora_alpha,
                lora_targets=encoder.lora_targets)


def prompt_tokens(encoder: nn.Module, batch: int) -> jax.Array:
    """The encoder's learned prompts, param 'prompts' [P, width] ('length', 'embed') initialised N(0, 0.02),
    broadcast to [batch, P, width] in its dtype."""
    prompts = encoder.param('prompts', partitioned(nn.initializers.normal(0.02), ('length', 'embed')),
                            (encoder.num_prompts, encoder.width), encoder.param_dtype)
    return jnp.broadcast_to(prompts.astype(encoder.dtype)[None], (batch, encoder.num_prompts, encoder.width))


def last_nonpad_index(tokens: jax.Array, pad_id: int = PAD_ID) -> jax.Array:
    """tokens int [B,L] -> int32 [B]: index of the last token != pad_id (0 for an all-pad row)."""
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)
    return jnp.max(jnp.where(tokens != pad_id, positions[None], 0), axis=1)


class TextTransformer(nn.Module):
    """Text transformer: token + learned position embeddings, pre-LN encoder, final LN.

    causal=True: causal mask (plus key padding mask); typically pool='eot' (features at the last non-pad token).
    causal=False: key padding mask only; typically pool='cls' (position 0, the BOS token).
    The embedding table has `vocab_size` rounded up to a multiple of `vocab_multiple` rows, so that the 'vocab'
    axis divides evenly over a sharded mesh axis (jax rejects uneven shardings); extra rows are never indexed.
    Fine-tuning fields (off by default; see `mmjax.finetune`): `num_prompts` P > 0 prepends P learned tokens
    'prompts' [P, width] (no position embedding; valid keys, seen by every text token under the causal mask);
    they are dropped from the returned tokens, and 'eot'/'cls' pooling reads the same text token as without
    them. `adapter_dim` / `lora_*` go to every encoder block.
    """
    vocab_size: int
    max_len: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    causal: bool = True
    pool: str = 'eot'
    vocab_multiple: int = 128
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

    @nn.compact
    def __call__(self, tokens: jax.Array, valid: jax.Array | None = None,
                 return_tokens: bool = True) -> tuple[jax.Array | None, jax.Array]:
        """tokens int32 [B,L] (L <= max_len, pad id 0) -> (tokens [B,L,width], pooled [B,width]) in `dtype`.

        `valid` bool [B,L] marks real tokens; default `tokens != 0`. Invalid positions are masked as keys.
        return_tokens=False: (None, pooled), and the last block computes the pooled token only
        (`mmjax.models.layers.Encoder` query_index), the same pooled features for less work.
        """
        if self.pool not in ('eot', 'cls'):
            raise ValueError(f"model.text.pool must be 'eot' or 'cls'; got {self.pool!r}")
        length = tokens.shape[1]
        if length > self.max_len:
            raise ValueError(f'text length {length} exceeds model.text.max_len {self.max_len}')
        valid = tokens != PAD_ID if valid is None else valid
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        rows = -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple
        x = Embed(rows, self.width, std=0.02, name='token_embed', **kw)(tokens)
        pos = self.param('pos_embed', partitioned(nn.initializers.normal(0.01), ('length', 'embed')),
                         (self.max_len, self.width), self.param_dtype)
        pos = constrain(pos[:length].astype(self.dtype), ('act_length', 'act_embed'))
        x = add_positions(x, pos)

        p = self.num_prompts
        keys = valid
        if p > 0:  # [B,P+L]: prompts first, always valid keys
            x = jnp.concatenate([prompt_tokens(self, x.shape[0]), x], axis=1)
            keys = jnp.concatenate([jnp.ones((valid.shape[0], p), bool), valid], axis=1)
        mask = keys[:, None, None, :]  # [B,1,1,P+L] keys
        if self.causal:
            mask = mask & jnp.tril(jnp.ones((p + length, p + length), bool))[None, None]
        encoder = Encoder(self.depth, self.num_heads, self.mlp_dim, remat=self.remat, scan=self.scan_layers,
                          activation=self.activation, name='transformer', **finetune_kwargs(self), **kw)
        if self.pool == 'cls':
            index = jnp.zeros((x.shape[0],), jnp.int32)
        else:
            index = last_nonpad_index(jnp.where(valid, 1, PAD_ID))
        if not return_tokens:  # the pooled token only, at its position after the prompts
            return None, pooled_token_features(encoder, x, mask, index + p, **kw)
        x = constrain(layer_norm(name='ln_final', **kw)(encoder(x, mask)[:, p:]), ACT_TOKENS)  # prompts dropped
        pooled = jnp.take_along_axis(x, index[:, None, None], axis=1)[:, 0]
        return x, constrain(pooled, ACT_POOLED)
