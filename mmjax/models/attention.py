"""Multi-head attention: the one attention implementation every self- and cross-attention in mmjax uses
(transformer blocks, fusion layers, gated cross-attention, the text decoder), with the key/value cache of
autoregressive decoding (`KVCache`, `write_cache`)."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.layers import ACT_HEADS, constrain, dense, lora_kwargs

Dtype = Any

# Logical axes of a cached key or value [B,H,T,K] (batch, head, cache slot, head width).
CACHE_AXES = ('cache_batch', 'cache_heads', 'cache_sequence', 'cache_kv')
# Keys/values inside attention, heads before positions: the layout the attention products read, so a decoding
# step reads its cache where it lies.
KV_AXES = ('act_batch', 'act_heads', 'act_length', 'act_kv')


class KVCache(NamedTuple):
    """Keys and values of one attention layer, `k` and `v` [B,H,T,K] (logical axes `CACHE_AXES`).

    A decoder's self-attention cache has one slot per position (T = the longest sequence it decodes, slots
    written as tokens arrive, see `write_cache`); a cross-attention cache holds the M media tokens' keys and
    values, computed once. Heads come before positions: the batched products of attention read (B, H) as their
    batch axes, so a decoding step reads the cache in place. Stored [B,T,H,K], every step copied each layer's
    cache into that order first; at open_clip CoCa's decoder shape that was most of a step's time.
    """
    k: jax.Array
    v: jax.Array

    @classmethod
    def zeros(cls, batch: int, length: int, num_heads: int, head_dim: int, dtype: Dtype = jnp.float32) -> KVCache:
        """An empty cache: k and v zeros [batch, num_heads, length, head_dim] in `dtype`."""
        shape = (batch, num_heads, length, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def write_cache(cache: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """cache [B,H,T,K] with new [B,H,L,K] written at slots start[b] .. start[b]+L-1 of each row (start int [B]);
    slots outside [0, T) are dropped. -> [B,H,T,K] in cache's dtype, constrained to `CACHE_AXES`.

    A select over the whole cache (for L > 1 after gathering `new` into the slots' order) rather than a
    scatter: elementwise in the batch and head axes, so it stays local to each shard of a sharded cache.
    """
    length, written = cache.shape[2], new.shape[2]
    offset = jnp.arange(length, dtype=jnp.int32)[None, :] - start.astype(jnp.int32)[:, None]  # [B,T]
    inside = ((offset >= 0) & (offset < written))[:, None, :, None]
    if written > 1:
        new = jnp.take_along_axis(new, jnp.clip(offset, 0, written - 1)[:, None, :, None], axis=2)
    return constrain(jnp.where(inside, new.astype(cache.dtype), cache), CACHE_AXES)


def einsum_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, scale: float,
                     dtype: Dtype) -> jax.Array:
    """Softmax attention spelled out: q [B,Lq,H,D], k and v [B,H,Lk,D] (heads first, see `KVCache`), bool mask
    broadcastable to [B,H,Lq,Lk] (True = may attend) -> [B,Lq,H,D]. Logits and softmax in float32, products in
    `dtype`.

    The heads sit next to the batch axis ([B,H,L,D]), so both products are batched matmuls over (B, H)
    contracting each operand's last axis. Contracting the [B,L,H,D] layouts directly, XLA:CPU made two more
    transposed copies per layer; this form runs an attention layer's forward (projections included) 7-18 %
    faster at ViT-B/32's text [32,77,8,64] and image [32,50,12,64] shapes (forward + backward: between 7 %
    faster and 1 % slower).
    """
    q = jnp.swapaxes(q * jnp.asarray(scale, q.dtype), 1, 2)
    logits = jnp.einsum('bhqd,bhkd->bhqk', q, k).astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(dtype)
    return jnp.swapaxes(jnp.einsum('bhqk,bhkd->bhqd', weights, v), 1, 2)


class MultiHeadAttention(nn.Module):
    """Multi-head dot-product attention, used for both self- and cross-attention.

    Attributes:
      num_heads: number of heads H.
      head_dim: per-head width K; defaults to E // H of the query input.
      out_features: output width; defaults to E of the query input.
      lora_rank, lora_alpha, lora_targets: LoRA (see `Dense`) on each projection whose '<module name>/<proj>'
        (e.g. 'attn/query'; projections query, key, value, out) fullmatches the regex `lora_targets`.
      implementation: 'auto' | 'einsum' | 'dot_product'. 'dot_product' is `jax.nn.dot_product_attention`
        (cuDNN fused attention on GPUs where it applies, XLA otherwise); 'einsum' spells the softmax out (what
        XLA's CPU and TPU compilers fuse best; `jax.nn.dot_product_attention` measured no faster on CPU).
        'auto' picks 'dot_product' on GPU with 16-bit compute, 'einsum' elsewhere.
    """
    num_heads: int
    head_dim: int | None = None
    out_features: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora_rank: int = 0
    lora_alpha: float = 1.0
    lora_targets: str = ''
    implementation: str = 'auto'

    @nn.compact
    def __call__(self, x_q: jax.Array, x_kv: jax.Array | None = None, mask: jax.Array | None = None, *,
                 kv: KVCache | None = None, cache: KVCache | None = None, cache_index: jax.Array | None = None,
                 return_kv: bool = False) -> jax.Array | tuple[jax.Array, KVCache]:
        """Attend from `x_q` [B,Lq,E] to `x_kv` [B,Lk,Ekv] (`x_q` itself when None).

        `mask` is bool, broadcastable to [B,H,Lq,Lk] (shape [B,1|H,Lq|1,Lk]); True = may attend.
        Returns [B,Lq,out_features].

        Decoding (keyword-only, all off by default):
          kv: KVCache [B,H,Lk,K]: the keys and values, used as they are instead of projecting `x_kv` (media
            keys/values computed once by an earlier call with `return_kv`).
          cache, cache_index int [B]: the keys/values of this call (from `x_kv`) are written into `cache`
            KVCache [B,H,T,K] at slots cache_index[b] + l (`write_cache`), and the queries attend to all T slots
            (`mask` [B,1|H,Lq|1,T] says which); returns (out, the updated cache).
          return_kv: returns (out, KVCache of this call's keys and values [B,H,Lk,K]).
        """
        x_kv = x_q if x_kv is None else x_kv
        width = x_q.shape[-1]
        if self.head_dim is None and width % self.num_heads:
            raise ValueError(f'width {width} is not divisible by num_heads {self.num_heads}')
        head_dim = self.head_dim or width // self.num_heads
        out_features = self.out_features or width
        proj = functools.partial(dense, (self.num_heads, head_dim), ('embed', 'heads', 'kv'),
                                 dtype=self.dtype, param_dtype=self.param_dtype)
        q = constrain(proj(name='query', **lora_kwargs(self, 'query'))(x_q), ACT_HEADS)
        if kv is not None:
            if cache is not None:
                raise ValueError('MultiHeadAttention: pass either kv (fixed keys/values) or cache, not both')
            k, v = (constrain(a.astype(self.dtype), KV_AXES) for a in kv)
        else:  # [B,Lk,H,K] projections, kept heads first ([B,H,Lk,K]) as attention reads them
            k, v = (constrain(jnp.swapaxes(proj(name=name, **lora_kwargs(self, name))(x_kv), 1, 2), KV_AXES)
                    for name in ('key', 'value'))
        new_kv = KVCache(k, v)
        if cache is not None:
            if cache_index is None:
                raise ValueError('MultiHeadAttention: a cache needs cache_index (the slot of the first new token)')
            new_kv = KVCache(write_cache(cache.k, k, cache_index), write_cache(cache.v, v, cache_index))
            k, v = (constrain(a.astype(self.dtype), KV_AXES) for a in new_kv)
        out = self._attend(q, k, v, mask, head_dim)
        out = dense(out_features, ('heads', 'kv', 'embed'), axis=(-2, -1), dtype=self.dtype,
                    param_dtype=self.param_dtype, name='out', **lora_kwargs(self, 'out'))(out)
        return (out, new_kv) if cache is not None or return_kv else out

    def _attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                head_dim: int) -> jax.Array:
        """q [B,Lq,H,K], k and v [B,H,Lk,K], mask as `__call__` -> [B,Lq,H,K] by the chosen implementation."""
        if self._use_dot_product_attention():
            if mask is not None:
                mask = jnp.broadcast_to(mask, (q.shape[0], mask.shape[1], q.shape[1], k.shape[2]))
            k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B,Lk,H,K], as jax.nn's attention takes them
            out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=head_dim ** -0.5)
        else:
            out = einsum_attention(q, k, v, mask, head_dim ** -0.5, self.dtype)
        return constrain(out, ACT_HEADS)

    def _use_dot_product_attention(self) -> bool:
        if self.implementation not in ('auto', 'einsum', 'dot_product'):
            raise ValueError(f"attention implementation must be 'auto', 'einsum' or 'dot_product'; "
                             f"got {self.implementation!r}")
        if self.implementation == 'auto':
            return jax.default_backend() == 'gpu' and jnp.dtype(self.dtype).itemsize == 2
        return self.implementation == 'dot_product'
