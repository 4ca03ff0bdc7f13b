"""CoCa (Yu et al. 2022, "Contrastive Captioners"): a contrastive image-text model whose text tower continues into
a captioning decoder, laid out as open_clip's `CoCa` so its weights convert exactly (`mmjax.interop.open_clip_coca`).

    images [B,H,W,C] -> ViT 'visual' -> tokens [B,N,Wv]
      -> AttentionalPooler 'pooler' (1 + Q learned queries) -> LayerNorm 'ln_pooled' -> [B,1+Q,D]
         query 0 -> 'image_proj' -> the contrastive image embedding [B,E] (unit norm)
         queries 1..Q -> media [B,Q,D] for the multimodal layers (standardised, see below)
    tokens [B,L] -> CocaTextEncoder 'text' (unimodal causal layers, a learned CLS appended after the L tokens)
         CLS output -> 'ln_final' -> 'text_proj' -> the contrastive text embedding [B,E] (unit norm)
         token outputs [B,L,W] -> Encoder 'decoder' (multimodal layers: causal self-attention, cross-attention
         to the media in every `cross_attention_every`-th block) -> 'ln_decoder' -> 'logits' [B,L,Vr]

The unimodal text never sees the image, so the text embedding is the image's independent of it. The logits at
position l are the next-token scores after token l (teacher forcing). Media enter the cross-attention blocks
as LayerNorm without scale or bias ('media_norm'): open_clip normalises them again in every cross-attention
block, whose per-block affine the converter folds into that block's key/value projections.

CLS attention follows open_clip's (legacy) CoCa mask: key j is visible when j == 0 or token j-1 is not PAD,
and causally, so the CLS at position L sees the real tokens and the first pad (not itself unless the text fills
the context); text tokens see the tokens before them.

Decoding reuses `decoder.DecoderCache` (one `BlockCache` per unimodal then multimodal block; the media go into
the empty cache and become each cross-attention block's keys/values on the first call): `CocaModel.init_cache`
and `coca_logits_fn`, the `logits_fn` of `mmjax.models.decoding`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.config import PAD_ID
from mmjax.models.attention import KVCache, MultiHeadAttention
from mmjax.models.decoder import ACT_LOGITS, DecoderCache, attention_mask
from mmjax.models.encoders import VOCAB_MULTIPLE, ViT
from mmjax.models.heads import ProjectionHead, l2_normalize, logit_scale
from mmjax.models.layers import ACT_POOLED, ACT_TOKENS, Embed, add_positions, constrain, dense, layer_norm, partitioned
from mmjax.models.transformer import BlockCache, Encoder

Dtype = Any


class AttentionalPooler(nn.Module):
    """Learned queries cross-attending to tokens: tokens [B,N,Wt] -> [B,num_queries,width].

    Params: 'query' [num_queries, width] ('length', 'embed'), 'ln_q' (on the queries), 'ln_k' (on the tokens),
    'attn' (`MultiHeadAttention`, queries of width `width` to keys/values of width Wt).
    """
    num_queries: int
    width: int
    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens [B,N,Wt] -> pooled queries [B,num_queries,width] in `dtype`."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        query = self.param('query', partitioned(nn.initializers.normal(1.0), ('length', 'embed')),
                           (self.num_queries, self.width), self.param_dtype)
        q = layer_norm(name='ln_q', **kw)(query.astype(self.dtype))
        k = layer_norm(name='ln_k', **kw)(tokens)
        q = jnp.broadcast_to(q[None], (tokens.shape[0],) + q.shape)
        return constrain(MultiHeadAttention(self.num_heads, name='attn', **kw)(q, k), ACT_TOKENS)


class CocaTextEncoder(nn.Module):
    """CoCa's unimodal text layers: 'token_embed', 'pos_embed' [max_len + 1, width] (the last row: the CLS
    position), 'cls' [width], a causal `Encoder` 'transformer', 'ln_final' (the CLS output only).

    Full pass (`cache` None): tokens int [B,L] (L <= max_len, right-padded with PAD) -> (token outputs [B,L,W]
    without a final norm, pooled CLS features [B,W] after 'ln_final'). Cached pass: tokens [B,l] at
    positions[b] + i, `cache` a tuple of `BlockCache` -> (token outputs [B,l,W], the updated caches); no CLS.
    """
    vocab_size: int
    max_len: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    vocab_multiple: int = VOCAB_MULTIPLE
    remat: str = 'none'
    activation: str = 'gelu'
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 cache: tuple[BlockCache, ...] | None = None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        rows = -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple
        x = Embed(rows, self.width, std=0.02, name='token_embed', **kw)(tokens)
        pos = self.param('pos_embed', partitioned(nn.initializers.normal(0.01), ('length', 'embed')),
                         (self.max_len + 1, self.width), self.param_dtype).astype(self.dtype)
        stack = Encoder(self.depth, self.num_heads, self.mlp_dim, remat=self.remat, activation=self.activation,
                        name='transformer', **kw)
        batch, length = tokens.shape
        if cache is not None:  # decoding: causal over the cache slots, no CLS
            query_pos = positions.astype(jnp.int32)[:, None] + jnp.arange(length, dtype=jnp.int32)[None]
            x = x + jnp.take(constrain(pos, ('length', None)), query_pos, axis=0)
            return stack(x, attention_mask(query_pos, cache[0].self_attn.k.shape[2]), cache=cache,
                         cache_index=positions.astype(jnp.int32))
        if length > self.max_len:
            raise ValueError(f'text length {length} exceeds model.text.max_len {self.max_len}')
        cls = self.param('cls', partitioned(nn.initializers.normal(0.01), ('embed',)), (self.width,),
                         self.param_dtype)
        x = jnp.concatenate([x, jnp.broadcast_to(cls.astype(self.dtype), (batch, 1, self.width))], axis=1)
        x = add_positions(x, constrain(pos[:length + 1], ('act_length', 'act_embed')))
        keys = jnp.concatenate([jnp.ones((batch, 1), bool), tokens != PAD_ID], axis=1)  # open_clip's CLS mask
        mask = keys[:, None, None, :] & jnp.tril(jnp.ones((length + 1, length + 1), bool))[None, None]
        x = stack(x, mask)
        pooled = layer_norm(name='ln_final', **kw)(x[:, length])
        return constrain(x[:, :length], ACT_TOKENS), constrain(pooled, ACT_POOLED)


class CocaModel(nn.Module):
    """CoCa, see the module docstring.

    image_kwargs: `ViT` kwargs as sorted (key, value) pairs (pool 'cls'); text_kwargs: `CocaTextEncoder` kwargs.
    caption_queries: Q, the pooler's captioning queries (one more query gives the contrastive embedding);
    pooler_width / pooler_heads: D and its heads. decoder_depth / decoder_heads / decoder_mlp_dim: the multimodal
    blocks (width = the text width), `cross_attention_every` k: cross-attention in every k-th of them.
    embed_dim E, logit_scale_init / logit_scale_max: as `ContrastiveModel`.
    """
    dual_encoder: ClassVar[bool] = True  # encode_image / encode_text: the dual-encoder evaluators apply
    image_kwargs: tuple[tuple[str, Any], ...]
    text_kwargs: tuple[tuple[str, Any], ...]
    embed_dim: int
    caption_queries: int
    pooler_width: int
    pooler_heads: int
    decoder_depth: int
    decoder_heads: int
    decoder_mlp_dim: int
    cross_attention_every: int = 1
    logit_scale_init: float = 2.6592600
    logit_scale_max: float | None = None
    remat: str = 'none'
    activation: str = 'gelu'
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.visual = ViT(**dict(self.image_kwargs))
        self.pooler = AttentionalPooler(1 + self.caption_queries, self.pooler_width, self.pooler_heads, **kw)
        self.ln_pooled = layer_norm(**kw)
        self.image_proj = ProjectionHead(self.embed_dim, **kw)
        self.text = CocaTextEncoder(**dict(self.text_kwargs))
        self.text_proj = ProjectionHead(self.embed_dim, **kw)
        self.media_norm = nn.LayerNorm(epsilon=1e-5, use_scale=False, use_bias=False, **kw)
        self.decoder = Encoder(self.decoder_depth, self.decoder_heads, self.decoder_mlp_dim, remat=self.remat,
                               activation=self.activation, cross_attention_every=self.cross_attention_every, **kw)
        self.ln_decoder = layer_norm(**kw)
        vocab = dict(self.text_kwargs)['vocab_size']
        rows = -(-vocab // dict(self.text_kwargs).get('vocab_multiple', VOCAB_MULTIPLE)) * \
            dict(self.text_kwargs).get('vocab_multiple', VOCAB_MULTIPLE)
        self.logits = dense(rows, ('embed', 'vocab'), use_bias=False, **kw)
        self.scale = logit_scale(self, self.logit_scale_init, self.logit_scale_max, self.param_dtype)

    @property
    def vocab_size(self) -> int:
        return int(dict(self.text_kwargs)['vocab_size'])

    def _image(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """images [B,H,W,C] -> (unit-norm embedding float32 [B,E], media [B,Q,D] standardised)."""
        tokens, _ = self.visual(images)
        pooled = self.ln_pooled(self.pooler(tokens))
        return l2_normalize(self.image_proj(pooled[:, 0])), self.media_norm(pooled[:, 1:])

    def _caption_logits(self, x: jax.Array) -> jax.Array:
        """Multimodal-stack outputs [B,L,W] -> float32 logits [B,L,Vr], columns >= vocab_size at float32 min."""
        logits = self.logits(self.ln_decoder(x)).astype(jnp.float32)
        real = jnp.arange(logits.shape[-1]) < self.vocab_size
        return constrain(jnp.where(real, logits, jnp.finfo(jnp.float32).min), ACT_LOGITS)

    def __call__(self, batch: dict[str, jax.Array], train: bool = False) -> dict[str, Any]:
        """{'image' [B,H,W,C], 'text' int32 [B,L]} -> {'embeddings': {'image', 'text'} float32 [B,E] unit-norm,
        'logit_scale' float32 [], 'caption_logits' float32 [B,L,Vr] (position l scores token l + 1)}."""
        del train
        image_emb, media = self._image(batch['image'])
        tokens, pooled = self.text(batch['text'])
        x = self.decoder(tokens, attention_mask(jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape[:2]),
                                                tokens.shape[1]), media=media)
        return {'embeddings': {'image': image_emb, 'text': l2_normalize(self.text_proj(pooled))},
                'logit_scale': self.scale, 'caption_logits': self._caption_logits(x)}

    def encode_image(self, images: jax.Array) -> jax.Array:
        """images float32 [B,H,W,C] -> float32 [B,E] unit-norm."""
        return self._image(images)[0]

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        """tokens int32 [B,L] -> float32 [B,E] unit-norm (the unimodal CLS)."""
        return l2_normalize(self.text_proj(self.text(tokens)[1]))

    def caption_media(self, images: jax.Array) -> jax.Array:
        """images [B,H,W,C] -> the media the multimodal blocks attend to [B,Q,D] (what `init_cache` takes)."""
        return self._image(images)[1]

    def decode(self, tokens: jax.Array, positions: jax.Array, cache: DecoderCache) -> tuple[jax.Array, DecoderCache]:
        """Cached step: tokens int32 [B,l] at positions[b] + i -> (logits float32 [B,l,Vr], the updated cache)."""
        depth = dict(self.text_kwargs)['depth']
        x, text_layers = self.text(tokens, positions, cache.layers[:depth])
        query_pos = positions.astype(jnp.int32)[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
        x, layers = self.decoder(x, attention_mask(query_pos, cache.length), media=cache.media,
                                 media_mask=cache.media_mask, cache=cache.layers[depth:],
                                 cache_index=positions.astype(jnp.int32))
        return self._caption_logits(x), cache._replace(layers=tuple(text_layers) + tuple(layers), media=None)

    def init_cache(self, media: jax.Array, length: int, dtype: Dtype | None = None) -> DecoderCache:
        """An empty `DecoderCache` for media [B,Q,D] (from `caption_media`) and `length` positions (<= text
        max_len): the unimodal blocks' then the multimodal blocks' caches. Needs no parameters."""
        text = dict(self.text_kwargs)
        if length > text['max_len']:
            raise ValueError(f'a cache of {length} positions exceeds the text max_len {text["max_len"]}')
        batch, width = media.shape[0], text['width']
        dtype = dtype or self.dtype
        layers = [BlockCache(KVCache.zeros(batch, length, text['num_heads'], width // text['num_heads'], dtype))
                  for _ in range(text['depth'])]
        layers += [BlockCache(KVCache.zeros(batch, length, self.decoder_heads, width // self.decoder_heads, dtype))
                   for _ in range(self.decoder_depth)]
        return DecoderCache(tuple(layers), jnp.zeros((batch,), jnp.int32), media, jnp.ones(media.shape[:2], bool))


def coca_logits_fn(model: CocaModel, banned: tuple[int, ...] = (PAD_ID,)) -> Callable:
    """`logits_fn(variables, tokens [B,l], cache, position [B]) -> (logits [B,l,Vr], cache)` of `model` for
    `mmjax.models.decoding`; the ids in `banned` (default PAD) are never generated (logit float32 min)."""
    def logits_fn(variables, tokens, cache, position):
        logits, cache = model.apply(variables, tokens, position, cache, method='decode')
        if banned:
            logits = logits.at[..., jnp.asarray(banned)].set(jnp.finfo(jnp.float32).min)
        return logits, cache
    return logits_fn


def build_coca_model(model_cfg, image_kwargs: tuple, text_kwargs: tuple) -> CocaModel:
    """`config.model` (its 'coca' section) and the towers' encoder kwargs -> CocaModel."""
    c = model_cfg.coca
    scale_max = model_cfg.get('logit_scale_max', None)
    text = dict(text_kwargs)
    return CocaModel(
        image_kwargs=image_kwargs, text_kwargs=text_kwargs, embed_dim=int(model_cfg.embed_dim),
        caption_queries=int(c.caption_queries), pooler_width=int(c.pooler_width or text['width']),
        pooler_heads=int(c.pooler_heads), decoder_depth=int(c.decoder_depth),
        decoder_heads=int(c.decoder_heads or text['num_heads']),
        decoder_mlp_dim=int(c.decoder_mlp_dim or text['mlp_dim']),
        cross_attention_every=int(c.cross_attention_every), logit_scale_init=float(model_cfg.logit_scale_init),
        logit_scale_max=None if scale_max is None else float(scale_max), remat=str(model_cfg.get('remat', 'none')),
        activation=str(model_cfg.get('activation', 'gelu')), dtype=jnp.dtype(model_cfg.get('dtype', 'float32')),
        param_dtype=jnp.dtype(model_cfg.get('param_dtype', 'float32')))
