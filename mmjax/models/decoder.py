"""The causal text decoder every generative model builds on (captioning as CoCa, PaLI-style prefix-LM, Flamingo,
an image-token decoder), and its decoding cache.

`TextDecoder` is token + learned position embeddings, a `transformer.Encoder` stack of pre-LN blocks (causal
self-attention, cross-attention to media tokens in every k-th block, MLP), a final LayerNorm and logits over the
vocabulary (tied to the token embedding or a separate 'logits' projection). Parameter names follow
`encoders.TextTransformer` ('token_embed', 'pos_embed', 'transformer/block_{i}', 'ln_final'), so a causal text
tower's parameters fit a decoder without cross-attention.

Attention is causal with an optional per-example prefix (`attention_mask`): token i sees token j when j <= i or
j < prefix_len[b], so the first prefix_len[b] tokens see each other both ways (PaLI's prefix-LM) and every later
token sees the whole prefix and itself and the tokens before it.

Decoding keeps an explicit cache pytree (`DecoderCache`, made by `TextDecoder.init_cache`): the keys/values of
every position already seen, one `BlockCache` per block, logical axes `attention.CACHE_AXES` (`cache_partition_specs`;
rules mapping 'cache_batch' to the batch mesh axes and 'cache_heads' to 'tensor' shard it as the activations). The media and prefix
lengths go into the empty cache; the first cached call (the prompt) turns the media into each cross-attention
block's keys/values, kept in the cache for every later step. `decoder_logits_fn` is the
`logits_fn(params, tokens, cache, position)` that `mmjax.models.decoding` generates with.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from mmjax.models.attention import CACHE_AXES, KVCache
from mmjax.models.encoders import VOCAB_MULTIPLE
from mmjax.models.layers import ACT_TOKENS, Embed, add_positions, constrain, dense, layer_norm, partitioned
from mmjax.models.transformer import BlockCache, Encoder

Dtype = Any
ACT_LOGITS = ('act_batch', 'act_length', 'act_vocab')


class DecoderCache(NamedTuple):
    """Decoding state of a `TextDecoder`; every leaf has a leading batch axis [B, ...].

    layers: one `BlockCache` per block: self-attention keys/values [B,H,T,K] (T = positions), and in
      cross-attention blocks the media keys/values [B,H,M,K] (None until the first cached call has seen media).
    prefix_len: int32 [B], the bidirectional prefix of each row (0: plain causal).
    media: [B,M,Em] until the first cached call turns it into keys/values, then None (None without media).
    media_mask: bool [B,M] (True = a real media token), None without media.
    """
    layers: tuple[BlockCache, ...]
    prefix_len: jax.Array
    media: jax.Array | None = None
    media_mask: jax.Array | None = None

    @property
    def length(self) -> int:
        """T, the number of positions the cache holds."""
        return self.layers[0].self_attn.k.shape[2]


def attention_mask(query_pos: jax.Array, num_keys: int, prefix_len: jax.Array | None = None) -> jax.Array:
    """query_pos int [B,L] (each query's position), keys at positions 0..num_keys-1, prefix_len int [B] | None ->
    bool [B,1,L,num_keys]: key j is visible to a query at position i when j <= i or j < prefix_len[b]."""
    keys = jnp.arange(num_keys, dtype=jnp.int32)[None, None, :]
    allowed = keys <= query_pos[:, :, None]
    if prefix_len is not None:
        allowed = allowed | (keys < prefix_len.astype(jnp.int32)[:, None, None])
    return allowed[:, None]


class TextDecoder(nn.Module):
    """Causal (or prefix-LM) text decoder with optional cross-attention to media, see the module docstring.

    vocab_size: V, the token ids; the embedding table has V rounded up to a multiple of `vocab_multiple` rows
      (even sharding over 'tensor'), and the logits have that many columns, those >= V at float32 min.
    max_len: positions (the 'pos_embed' table); a cache holds at most this many.
    cross_attention_every: k > 0 gives every k-th block cross-attention to media (0: none; 1: every block, as
      CoCa's multimodal decoder); `cross_attention_gated`: tanh gates initialised at 0 (Flamingo).
    tie_embedding: logits = final features @ token table^T; False: a separate 'logits' Dense ('embed', 'vocab').
    remat / activation / dtype / param_dtype: as `transformer.Encoder`; the logits are float32.
    """
    vocab_size: int
    max_len: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    cross_attention_every: int = 0
    cross_attention_gated: bool = False
    tie_embedding: bool = True
    vocab_multiple: int = VOCAB_MULTIPLE
    remat: str = 'none'
    activation: str = 'gelu'
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None, cache: DecoderCache | None = None,
                 *, media: jax.Array | None = None, media_mask: jax.Array | None = None,
                 prefix_len: jax.Array | None = None,
                 prefix_embeddings: jax.Array | None = None) -> jax.Array | tuple[jax.Array, DecoderCache]:
        """tokens int32 [B,L] -> logits float32 [B,L,Vr] (Vr = vocab rows), the next-token distribution at each.

        Full pass (training, `cache` None): tokens at positions 0..L-1 (`positions` must be None), media
        [B,M,Em] and media_mask bool [B,M] or [B,L,M] (per token) | None for the cross-attention blocks, prefix_len int [B] | None.
        Right padding needs no mask: a real token never sees a later (pad) one, as long as prefix_len[b] does
        not reach into the padding.
        Cached pass (decoding): `cache` from `init_cache`, positions int [B] (the position of tokens[:, 0] in
        each row; token l goes to slot positions[b] + l); media, media_mask and prefix_len come from the cache.
        Returns (logits, the updated cache).
        prefix_embeddings [B,M,width] (M <= L), either pass: added to the input embeddings of this call's first M
        tokens (PaLI's media tokens in their slots; in decoding, pass them with the prompt only).
        """
        if cache is not None and (media is not None or media_mask is not None or prefix_len is not None):
            raise ValueError('TextDecoder: with a cache, media, media_mask and prefix_len go into init_cache')
        if cache is None and positions is not None:
            raise ValueError('TextDecoder: positions are for cached decoding; a full pass starts at position 0')
        length = tokens.shape[1]
        stack = Encoder(self.depth, self.num_heads, self.mlp_dim, remat=self.remat, activation=self.activation,
                        dtype=self.dtype, param_dtype=self.param_dtype,
                        cross_attention_every=self.cross_attention_every,
                        cross_attention_gated=self.cross_attention_gated, name='transformer')
        if cache is None:
            x, table = self._embed(tokens, None, prefix_embeddings)
            query_pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), tokens.shape)
            x = stack(x, attention_mask(query_pos, length, prefix_len), media=media, media_mask=media_mask)
            return self._logits(x, table)
        if length > cache.length:
            raise ValueError(f'TextDecoder: {length} tokens do not fit a cache of {cache.length} positions')
        positions = positions.astype(jnp.int32)
        x, table = self._embed(tokens, positions, prefix_embeddings)
        query_pos = positions[:, None] + jnp.arange(length, dtype=jnp.int32)[None]
        x, layers = stack(x, attention_mask(query_pos, cache.length, cache.prefix_len), media=cache.media,
                          media_mask=cache.media_mask, cache=cache.layers, cache_index=positions)
        return self._logits(x, table), cache._replace(layers=layers, media=None)

    def _embed(self, tokens: jax.Array, positions: jax.Array | None,
               prefix_embeddings: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """tokens int [B,L] at positions positions[b] + l (0 + l when None) -> (embeddings + learned positions
        (+ prefix_embeddings [B,M,width] on the first M) [B,L,width] in `dtype`, the token table [Vr,width])."""
        rows = -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple
        embed = Embed(rows, self.width, std=0.02, dtype=self.dtype, param_dtype=self.param_dtype,
                      name='token_embed')
        x = embed(tokens)
        pos = self.param('pos_embed', partitioned(nn.initializers.normal(0.01), ('length', 'embed')),
                         (self.max_len, self.width), self.param_dtype)
        if positions is None:
            if tokens.shape[1] > self.max_len:
                raise ValueError(f'text length {tokens.shape[1]} exceeds the decoder max_len {self.max_len}')
            x = add_positions(x, constrain(pos[:tokens.shape[1]].astype(self.dtype), ('act_length', 'act_embed')))
        else:  # per-row offsets: gathered from the table replicated along 'embed', as `Embed` does
            index = positions[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
            x = x + jnp.take(constrain(pos.astype(self.dtype), ('length', None)), index, axis=0)
        if prefix_embeddings is not None:
            extra = prefix_embeddings.shape[1]
            if extra > tokens.shape[1]:
                raise ValueError(f'TextDecoder: {extra} prefix embeddings do not fit {tokens.shape[1]} tokens')
            x = x + jnp.pad(prefix_embeddings.astype(x.dtype), ((0, 0), (0, tokens.shape[1] - extra), (0, 0)))
        table = nn.meta.unbox(embed.variables['params']['embedding'])
        return constrain(x, ACT_TOKENS), table

    def _logits(self, x: jax.Array, table: jax.Array) -> jax.Array:
        """Final features [B,L,width] -> float32 logits [B,L,Vr], the padding columns at float32 min."""
        x = layer_norm(name='ln_final', dtype=self.dtype, param_dtype=self.param_dtype)(x)
        if self.tie_embedding:
            logits = jnp.einsum('ble,ve->blv', x, table.astype(self.dtype))
        else:
            logits = dense(table.shape[0], ('embed', 'vocab'), use_bias=False, dtype=self.dtype,
                           param_dtype=self.param_dtype, name='logits')(x)
        real = jnp.arange(table.shape[0]) < self.vocab_size
        logits = jnp.where(real, logits.astype(jnp.float32), jnp.finfo(jnp.float32).min)
        return constrain(logits, ACT_LOGITS)

    def init_cache(self, batch: int, length: int, *, media: jax.Array | None = None,
                   media_mask: jax.Array | None = None, prefix_len: jax.Array | None = None,
                   dtype: Dtype | None = None) -> DecoderCache:
        """An empty `DecoderCache` for `batch` rows and `length` positions (<= max_len) in `dtype` (default the
        compute dtype), carrying media [batch,M,Em] with media_mask bool [batch,M] (default all valid) for the
        cross-attention blocks and prefix_len int [batch] (default 0). Needs no parameters: call it on the
        module itself (`decoder.init_cache(...)`)."""
        if length > self.max_len:
            raise ValueError(f'a cache of {length} positions exceeds the decoder max_len {self.max_len}')
        if (self.cross_attention_every > 0) != (media is not None):
            raise ValueError('TextDecoder.init_cache: pass media exactly when the decoder has cross-attention '
                             f'(cross_attention_every={self.cross_attention_every})')
        if media is not None and media_mask is None:
            media_mask = jnp.ones(media.shape[:2], bool)
        empty = KVCache.zeros(batch, length, self.num_heads, self.width // self.num_heads, dtype or self.dtype)
        prefix = jnp.zeros((batch,), jnp.int32) if prefix_len is None else jnp.asarray(prefix_len, jnp.int32)
        return DecoderCache(tuple(BlockCache(empty) for _ in range(self.depth)), prefix,
                            media, None if media_mask is None else jnp.asarray(media_mask, bool))


def cache_partition_specs(cache: DecoderCache) -> DecoderCache:
    """The logical PartitionSpec of every leaf of `cache` (None where the cache has None): keys/values
    `attention.CACHE_AXES`, media ('cache_batch', 'cache_sequence', None), media_mask ('cache_batch',
    'cache_sequence'), prefix_len ('cache_batch',). `nn.logical_to_mesh_sharding(specs, mesh, rules)` gives the
    NamedShardings (for jit's in/out shardings)."""
    def kv(c: KVCache | None) -> KVCache | None:
        return None if c is None else KVCache(PartitionSpec(*CACHE_AXES), PartitionSpec(*CACHE_AXES))

    return DecoderCache(
        tuple(BlockCache(kv(b.self_attn), kv(b.cross_attn)) for b in cache.layers),
        PartitionSpec('cache_batch'),
        None if cache.media is None else PartitionSpec('cache_batch', 'cache_sequence', None),
        None if cache.media_mask is None else PartitionSpec('cache_batch', 'cache_sequence'))


def decoder_logits_fn(decoder: TextDecoder) -> Callable[[Any, jax.Array, DecoderCache, jax.Array],
                                                        tuple[jax.Array, DecoderCache]]:
    """`logits_fn(variables, tokens [B,L], cache, position [B]) -> (logits [B,L,Vr], cache)` of `decoder`, what
    `mmjax.models.decoding` generates with (variables: `{'params': ...}`)."""
    def logits_fn(variables, tokens, cache, position):
        return decoder.apply(variables, tokens, position, cache)
    return logits_fn
