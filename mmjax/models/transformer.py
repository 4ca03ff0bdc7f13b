"""The pre-LN transformer block and the stack (unrolled or scanned, optional remat) built from it: the encoder of
every tower, and with optional cross-attention and a key/value cache, the stack of `decoder.TextDecoder`."""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.attention import KVCache, MultiHeadAttention
from mmjax.models.layers import (
    ACT_POOLED,
    ACT_TOKENS,
    REMAT_POLICIES,
    Adapter,
    Mlp,
    constrain,
    layer_norm,
    partitioned,
    remat_module,
    strip_boxes,
)

Dtype = Any


def take_rows(x: jax.Array, index: jax.Array) -> jax.Array:
    """x [B,L,...], index int [B] -> [B,1,...]: row index[b] of each sequence."""
    return jnp.take_along_axis(x, index.reshape((-1, 1) + (1,) * (x.ndim - 2)), axis=1)


def query_mask_rows(mask: jax.Array, index: jax.Array) -> jax.Array:
    """Attention mask bool [B|1,1|H,Lq|1,Lk] -> [B,1|H,1,Lk]: the rows of queries `index` int [B]."""
    mask = jnp.broadcast_to(mask, (index.shape[0],) + mask.shape[1:])
    if mask.shape[2] == 1:
        return mask
    return jnp.take_along_axis(mask, index.reshape(-1, 1, 1, 1), axis=2)


class BlockCache(NamedTuple):
    """Decoding state of one `EncoderBlock`: its self-attention keys/values `self_attn` [B,H,T,K] (one slot per
    position) and, in a block with cross-attention once the media were seen, the media keys/values `cross_attn`
    [B,H,M,K] (None before that, and in blocks without cross-attention)."""
    self_attn: KVCache
    cross_attn: KVCache | None = None


def has_cross_attention(index: int, every: int) -> bool:
    """Whether block `index` of a stack with `cross_attention_every` = `every` has cross-attention: every
    `every`-th block (after block i when (i + 1) % every == 0); none when every <= 0."""
    return every > 0 and (index + 1) % every == 0


def media_attention_mask(media_mask: jax.Array) -> jax.Array:
    """media_mask bool [B,M] (the same media for every query) or [B,L,M] (per query: what token l may see) ->
    the cross-attention mask [B,1,1,M] or [B,1,L,M]."""
    media_mask = media_mask.astype(bool)
    return media_mask[:, None, None, :] if media_mask.ndim == 2 else media_mask[:, None]


class EncoderBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x)).

    With `scan_carry=True` the call returns `(x, None)` so the block can be the body of `nn.scan`.
    Fine-tuning fields (all off by default, leaving the parameter tree unchanged): `adapter_dim` > 0 adds
    zero-initialised `Adapter`s 'adapter_attn' / 'adapter_mlp' on the attention and MLP outputs (before the
    residual add); `lora_*` add LoRA to the attention/MLP projections matching `lora_targets` (see
    `layers.Dense`; the cross-attention's projections are 'xattn/query', ...).
    Decoder fields (off by default): `cross_attention` adds x + xattn(ln_xattn(x), media) between the
    self-attention and the MLP ('ln_xattn', 'xattn'; media [B,M,Em] are used as given, an encoder's final-LN
    output); `cross_attention_gated` scales it by tanh('xattn_gate'), a scalar initialised at 0 (Flamingo: the
    block then computes exactly what it computes without cross-attention).
    """
    num_heads: int
    mlp_dim: int
    activation: str = 'gelu'
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_carry: bool = False
    adapter_dim: int = 0
    lora_rank: int = 0
    lora_alpha: float = 1.0
    lora_targets: str = ''
    cross_attention: bool = False
    cross_attention_gated: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None, query_index: jax.Array | None = None, *,
                 media: jax.Array | None = None, media_mask: jax.Array | None = None,
                 cache: BlockCache | None = None, cache_index: jax.Array | None = None):
        """x [B,L,E], mask bool [B|1,1|H,L|1,L] or None -> [B,L,E] (or `(x, None)` when `scan_carry`).

        `query_index` int [B]: compute only token `query_index[b]` of each sequence, attending to all L keys, ->
        [B,1,E], equal to the full block's output at that token (what a pooled-only last block needs: its
        other tokens feed nothing). Keys and values are still projected for every token.
        With `cross_attention`: media [B,M,Em] and media_mask bool [B,M] or [B,L,M] (per token) | None (True = a real media token; a
        row without any gets no cross-attention update).
        Decoding: `cache` BlockCache and `cache_index` int [B] (the position of x's first token in each row):
        x's keys/values are written into the cache's slots and attention runs over all T slots (mask
        [B,1|H,L|1,T]); the media keys/values are computed when `media` is given and read from the cache
        otherwise. Returns (x [B,L,E], the updated BlockCache).
        """
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        lora = dict(lora_rank=self.lora_rank, lora_alpha=self.lora_alpha, lora_targets=self.lora_targets)
        h = layer_norm(name='ln_attn', **kw)(x)
        h_kv, self_kv, cross_kv = None, None, None
        if query_index is not None:
            if cache is not None:
                raise ValueError('EncoderBlock: query_index and a decoding cache do not combine')
            x, h_kv, h = take_rows(x, query_index), h, take_rows(h, query_index)
            mask = None if mask is None else query_mask_rows(mask, query_index)
        attn = MultiHeadAttention(self.num_heads, name='attn', **lora, **kw)
        if cache is None:
            h = attn(h, h_kv, mask)
        else:
            h, self_kv = attn(h, mask=mask, cache=cache.self_attn, cache_index=cache_index)
        if self.adapter_dim > 0:
            h = Adapter(self.adapter_dim, self.activation, name='adapter_attn', **kw)(h)
        x = constrain(x + h, ACT_TOKENS)
        if self.cross_attention:
            x, cross_kv = self._cross_attend(x, media, media_mask, None if cache is None else cache.cross_attn)
        h = layer_norm(name='ln_mlp', **kw)(x)
        h = Mlp(self.mlp_dim, self.activation, name='mlp', **lora, **kw)(h)
        if self.adapter_dim > 0:
            h = Adapter(self.adapter_dim, self.activation, name='adapter_mlp', **kw)(h)
        x = constrain(x + h, ACT_TOKENS)
        if cache is not None:
            return x, BlockCache(self_kv, cross_kv)
        return (x, None) if self.scan_carry else x

    def _cross_attend(self, x: jax.Array, media: jax.Array | None, media_mask: jax.Array | None,
                      cached: KVCache | None) -> tuple[jax.Array, KVCache]:
        """x [B,L,E] -> (x + [tanh(gate) *] xattn(ln_xattn(x), media) [B,L,E], the media keys/values
        [B,H,M,K]), from `media` [B,M,Em] when given, else from `cached`."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if media is None and cached is None:
            raise ValueError('EncoderBlock with cross_attention needs media (or their cached keys/values)')
        mask = None if media_mask is None else media_attention_mask(media_mask)
        attn = MultiHeadAttention(self.num_heads, name='xattn', lora_rank=self.lora_rank,
                                  lora_alpha=self.lora_alpha, lora_targets=self.lora_targets, **kw)
        h = layer_norm(name='ln_xattn', **kw)(x)
        if media is None:
            h, kv = attn(h, mask=mask, kv=cached), cached
        else:
            h, kv = attn(h, media, mask, return_kv=True)
        if media_mask is not None:  # no valid media token: no update (not a uniform mix of masked ones)
            seen = jnp.any(media_mask, axis=-1).astype(h.dtype)  # [B] or [B,L]
            h = h * seen.reshape(seen.shape + (1,) * (h.ndim - seen.ndim))
        if self.cross_attention_gated:
            gate = self.param('xattn_gate', partitioned(nn.initializers.zeros_init(), ()), (), self.param_dtype)
            h = h * jnp.tanh(jnp.asarray(gate, self.dtype))
        return constrain(x + h, ACT_TOKENS), kv


class Encoder(nn.Module):
    """Stack of `depth` `EncoderBlock`s.

    Params live under 'block_{i}' (unrolled) or under 'blocks' with a leading 'layers' axis of size `depth`
    (`scan=True`). `remat` is 'none' | 'full' | 'dots' (jax.checkpoint per block; 'dots' saves matmul outputs).
    adapter_dim / lora_*: passed to every block (see `EncoderBlock`). `cross_attention_every` k > 0 gives every
    k-th block cross-attention to media (`has_cross_attention`; `cross_attention_gated`: tanh-gated), which
    needs the unrolled stack, as does decoding with a cache.
    """
    depth: int
    num_heads: int
    mlp_dim: int
    remat: str = 'none'
    scan: bool = False
    activation: str = 'gelu'
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    adapter_dim: int = 0
    lora_rank: int = 0
    lora_alpha: float = 1.0
    lora_targets: str = ''
    cross_attention_every: int = 0
    cross_attention_gated: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None, query_index: jax.Array | None = None, *,
                 media: jax.Array | None = None, media_mask: jax.Array | None = None,
                 cache: tuple[BlockCache, ...] | None = None, cache_index: jax.Array | None = None):
        """x [B,L,E], mask bool [B|1,1|H,L,L] or None -> [B,L,E].

        With `query_index` int [B] the last block computes only token `query_index[b]` (see `EncoderBlock`)
        -> [B,1,E]: the pooled token of a tower whose other outputs are not used. Every earlier block runs in
        full, since the last one attends to all of their tokens.
        media [B,M,Em], media_mask bool [B,M] or [B,L,M] | None: what the cross-attention blocks attend to.
        Decoding: `cache` (one BlockCache per block) and `cache_index` int [B] (see `EncoderBlock`; mask
        [B,1|H,L,T]) -> (x [B,L,E], the updated caches).
        """
        block_cls = remat_module(EncoderBlock, self.remat, prevent_cse=not self.scan)
        kw = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, activation=self.activation,
                  dtype=self.dtype, param_dtype=self.param_dtype, adapter_dim=self.adapter_dim,
                  lora_rank=self.lora_rank, lora_alpha=self.lora_alpha, lora_targets=self.lora_targets)
        x = constrain(x, ACT_TOKENS)
        if self.scan:
            if self.cross_attention_every > 0 or cache is not None:
                raise ValueError('Encoder: cross-attention and decoding caches need the unrolled stack (scan=False)')
            return self._scanned(block_cls, kw, x, mask, query_index)
        caches = []
        for i in range(self.depth):
            last = query_index is not None and i == self.depth - 1
            block = block_cls(name=f'block_{i}', cross_attention=has_cross_attention(i, self.cross_attention_every),
                              cross_attention_gated=self.cross_attention_gated, **kw)
            if cache is None:
                x = block(x, mask, query_index if last else None, media=media, media_mask=media_mask)
            else:
                x, block_cache = block(x, mask, media=media, media_mask=media_mask, cache=cache[i],
                                       cache_index=cache_index)
                caches.append(block_cache)
        return x if cache is None else (x, tuple(caches))

    def _scanned(self, block_cls: type[nn.Module], kw: dict[str, Any], x: jax.Array, mask: jax.Array | None,
                 query_index: jax.Array | None) -> jax.Array:
        """The `scan=True` stack: x [B,L,E] -> [B,L,E], or [B,1,E] with `query_index` (see `__call__`)."""
        if query_index is not None and not self.is_initializing():
            # Same parameters (under 'blocks', leading 'layers' axis), applied as depth-1 scanned blocks
            # and a last block with one query per sequence.
            return ScannedBlocksWithQuery(tuple(sorted(kw.items())), self.remat, name='blocks')(
                x, mask, query_index)
        blocks = nn.scan(
            block_cls, variable_axes={'params': 0}, split_rngs={'params': True},
            in_axes=nn.broadcast, length=self.depth,
            metadata_params={nn.PARTITION_NAME: 'layers'},
        )(scan_carry=True, name='blocks', **kw)
        x, _ = blocks(x, mask)
        return x if query_index is None else take_rows(x, query_index)


def pooled_token_features(encoder: Encoder, x: jax.Array, mask: jax.Array | None, index: jax.Array,
                          dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32) -> jax.Array:
    """A tower's pooled features without its tokens: `encoder` on x [B,L,E] with its last block computing
    token `index` int [B] only, then the calling tower's final LayerNorm 'ln_final' -> [B,E].
    Call it from the tower's compact `__call__` (the LayerNorm is created there)."""
    x = encoder(x, mask, query_index=index)[:, 0]
    return constrain(layer_norm(name='ln_final', dtype=dtype, param_dtype=param_dtype)(x), ACT_POOLED)


class ScannedBlocksWithQuery(nn.Module):
    """The parameters of `Encoder`'s scanned block stack (this module's variables: every `EncoderBlock`
    parameter with a leading 'layers' axis of size depth), applied as a `jax.lax.scan` over the first depth-1
    blocks and the last block with `query_index`. Apply-only: `Encoder` creates the parameters through
    `nn.scan` at init, so the parameter tree is the one a full pass uses."""
    block_kwargs: tuple[tuple[str, Any], ...]
    remat: str = 'none'

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None, query_index: jax.Array) -> jax.Array:
        """x [B,L,E], mask as `Encoder`, query_index int [B] -> [B,1,E]."""
        params = strip_boxes(self.variables['params'])  # boxed when applied to an init output
        block = EncoderBlock(parent=None, **dict(self.block_kwargs))

        def apply_block(x, layer_params, index):
            return block.apply({'params': layer_params}, x, mask, index)

        if self.remat != 'none':
            apply_block = jax.checkpoint(apply_block, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
        x, _ = jax.lax.scan(lambda x, p: (apply_block(x, p, None), None), x,
                            jax.tree.map(lambda a: a[:-1], params))
        return apply_block(x, jax.tree.map(lambda a: a[-1], params), query_index)
