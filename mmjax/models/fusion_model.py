"""Models built on fusion: an image-text classifier and ITM/MLM heads for contrastive + ITM + MLM pretraining.

- `FusionClassifier`: ViT + TextTransformer -> CoAttention layers (text padding mask) -> pooled features (mean for
  image tokens, masked mean for text) -> fusion (any `build_fusion` mode) -> MLP head -> logits [B, num_classes].
  Built from `config.model` (sections image, text, fusion) by `build_fusion_classifier`. With
  model.fusion.contrastive_weight > 0 the towers also get CLIP projection heads for an auxiliary contrastive loss
  (objectives.classification_contrastive_loss).
- `ItmMlmHeads`: fuses text tokens with image tokens (text queries attend to the image), an ITM logit on the fused
  CLS/EOT token and MLM vocabulary logits on every fused token.
- `ContrastiveItmMlmModel`: `ContrastiveModel` plus `ItmMlmHeads` (param 'itm_mlm'); hard ITM negatives are mined
  inside the batch from the contrastive similarity. Built by `build_itm_mlm_model`.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mmjax.config import PAD_ID
from mmjax.models.encoders import TextTransformer, ViT, last_nonpad_index
from mmjax.models.fusion import FUSION_MODES, CoAttention, CrossAttention, build_fusion, masked_mean
from mmjax.models.heads import ProjectionHead, l2_normalize, logit_scale
from mmjax.models.layers import ACT_POOLED, ACT_TOKENS, activation_fn, constrain, dense, layer_norm
from mmjax.models.model import ContrastiveModel, build_model, encoder_kwargs
from mmjax.models.transformer import EncoderBlock

Dtype = Any
Kwargs = tuple[tuple[str, Any], ...]



def itm_negatives(sim: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """Hard negatives mined inside the batch.

    Args:
        sim: [B, B] similarity logits (e.g. logit_scale * x @ y.T); row i scores candidates j for query i, and
            (i, i) is the positive pair. No gradient flows through it.
        rng: PRNG key: sample j with probability softmax(sim[i, j]) over j != i. None: the hardest negative
            (argmax over j != i).

    Returns:
        int32 [B]: for each row i a column index j != i. Only the diagonal is excluded, so in a batch with duplicate
        captions an identical caption at j != i may be drawn (and labelled a negative); the positive pair never is.
    """
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f'itm_negatives needs a square similarity matrix [B, B]; got {sim.shape}')
    b = sim.shape[0]
    if b < 2:
        raise ValueError(f'itm_negatives needs a batch of at least 2 to find a negative; got B={b}')
    sim = jax.lax.stop_gradient(sim).astype(jnp.float32)
    k = jnp.arange(b - 1, dtype=jnp.int32)[None, :]
    columns = k + (k >= jnp.arange(b, dtype=jnp.int32)[:, None])  # [B, B-1]: every column but i
    off_diag = jnp.take_along_axis(sim, columns, axis=1)
    pick = jnp.argmax(off_diag, axis=1) if rng is None else jax.random.categorical(rng, off_diag, axis=1)
    return jnp.take_along_axis(columns, pick[:, None].astype(jnp.int32), axis=1)[:, 0]


class EncoderSlot(nn.Module):
    """Holds one encoder under 'encoder' (and, with `embed_dim`, a ProjectionHead under 'head'), so params sit at
    '<slot>/encoder/...' and '<slot>/head/kernel' as in a ContrastiveModel tower (a contrastive checkpoint's
    towers transplant unchanged).

    Returns (tokens [B,N,W], pooled [B,W], embedding float32 [B,embed_dim] unit-norm, or None without
    `embed_dim`).
    """
    encoder_cls: type[nn.Module]
    encoder_kwargs: Kwargs
    embed_dim: int | None = None

    @nn.compact
    def __call__(self, *args, **kwargs):
        tokens, pooled = self.encoder_cls(**dict(self.encoder_kwargs), name='encoder')(*args, **kwargs)
        if self.embed_dim is None:
            return tokens, pooled, None
        enc = dict(self.encoder_kwargs)
        head = ProjectionHead(self.embed_dim, dtype=enc.get('dtype', jnp.float32),
                              param_dtype=enc.get('param_dtype', jnp.float32), name='head')
        return tokens, pooled, l2_normalize(head(pooled))


class ClassifierHead(nn.Module):
    """LN -> Dense(hidden) -> GELU -> Dense(num_classes): [B,E] -> float32 [B,num_classes]."""
    hidden: int
    num_classes: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = dense(self.hidden, ('embed', 'mlp'), name='fc_in', **kw)(layer_norm(name='ln', **kw)(z))
        h = constrain(nn.gelu(h), ('act_batch', 'act_mlp'))
        logits = dense(self.num_classes, ('mlp', None), name='fc_out', **kw)(h)
        return constrain(logits.astype(jnp.float32), ('act_batch', None))


class FusionClassifier(nn.Module):
    """Image + text classifier through co-attention and a fusion module.

    Params: 'image/encoder' (ViT), 'text/encoder' (TextTransformer), 'coattn_{i}' (CoAttention, text = side a,
    image = side b), 'fusion', 'head'. Fusion inputs are (text, image): pooled features for concat/weighted/gated,
    token sequences with masks for 'xattn' (text tokens attend to image tokens).

    With `embed_dim` (an auxiliary contrastive objective, config model.fusion.contrastive_weight > 0) each tower
    also gets a ContrastiveModel-style projection head ('image/head', 'text/head') on its own pooled output (ViT
    CLS / text EOT, before co-attention) and the model a learned temperature 'logit_scale' (log space, clipped
    at `logit_scale_max`). They are returned only with `with_embeddings=True`.
    """
    image_kwargs: Kwargs
    text_kwargs: Kwargs
    mode: str
    num_layers: int
    num_heads: int
    mlp_dim: int
    hidden: int
    num_classes: int
    proj_dim: int | None = None
    per_feature: bool = True
    embed_dim: int | None = None
    logit_scale_init: float = math.log(1 / 0.07)
    logit_scale_max: float | None = math.log(100.0)
    activation: str = 'gelu'
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, batch: dict[str, jax.Array], train: bool = False,
                 with_embeddings: bool = False) -> jax.Array | dict[str, Any]:
        """batch {'image': float32 [B,H,W,C], 'text': int32 [B,L], optional 'text_mask': bool [B,L] (default
        text != 0)} -> logits float32 [B,num_classes]. `train` is accepted for API symmetry (no dropout).

        with_embeddings=True (needs `embed_dim`): {'logits': [B,num_classes], 'embeddings': {'image', 'text':
        float32 [B,embed_dim] unit-norm}, 'logit_scale': float32 [] (exp'd, clipped)}.
        """
        del train
        if with_embeddings and self.embed_dim is None:
            raise ValueError('FusionClassifier: with_embeddings=True needs embed_dim (config '
                             'model.fusion.contrastive_weight > 0)')
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        text_mask = batch.get('text_mask')
        text_mask = batch['text'] != PAD_ID if text_mask is None else text_mask.astype(bool)
        image, _, image_emb = EncoderSlot(ViT, self.image_kwargs, self.embed_dim, name='image')(batch['image'])
        text, _, text_emb = EncoderSlot(TextTransformer, self.text_kwargs, self.embed_dim,
                                        name='text')(batch['text'], text_mask)
        scale = (None if self.embed_dim is None
                 else logit_scale(self, self.logit_scale_init, self.logit_scale_max, self.param_dtype))
        for i in range(self.num_layers):
            text, image = CoAttention(self.num_heads, self.mlp_dim, self.activation, name=f'coattn_{i}',
                                      **kw)(text, image, text_mask, None)
        fusion = build_fusion(self.mode, proj_dim=self.proj_dim, num_heads=self.num_heads,
                              per_feature=self.per_feature, name='fusion', **kw)
        if fusion.needs_tokens:
            z = fusion(text, image, text_mask, None)
        else:
            z = fusion(constrain(masked_mean(text, text_mask), ACT_POOLED), constrain(image.mean(axis=1), ACT_POOLED))
        logits = ClassifierHead(self.hidden, self.num_classes, name='head', **kw)(z)
        if not with_embeddings:
            return logits
        return {'logits': logits, 'embeddings': {'image': image_emb, 'text': text_emb}, 'logit_scale': scale}


FUSION_KEYS = {'mode': None, 'num_layers': None, 'num_heads': None, 'mlp_dim': None, 'hidden': None,
               'num_classes': None, 'proj_dim': 'optional', 'per_feature': 'optional',
               'contrastive_weight': 'optional', 'backbone': 'optional'}


def _section(model_cfg: ml_collections.ConfigDict, name: str, keys: dict[str, Any]) -> dict[str, Any]:
    """`model_cfg[name]` as a dict, checked against `keys` (None = required, 'optional' = may be absent/None)."""
    if name not in model_cfg or model_cfg[name] is None:
        raise ValueError(f'config model.{name} is required')
    section = model_cfg[name]
    section = section.to_dict() if isinstance(section, ml_collections.ConfigDict) else dict(section)
    unknown = sorted(set(section) - set(keys))
    if unknown:
        raise ValueError(f'unknown keys {[f"model.{name}.{k}" for k in unknown]}; allowed: {sorted(keys)}')
    missing = [f'model.{name}.{k}' for k, v in keys.items() if v is None and section.get(k) is None]
    if missing:
        raise ValueError(f'config is missing {missing}')
    return {k: v for k, v in section.items() if v is not None}


def build_fusion_classifier(model_cfg: ml_collections.ConfigDict) -> FusionClassifier:
    """`config.model` with sections image, text and fusion {mode, num_layers, num_heads, mlp_dim, hidden,
    num_classes, proj_dim (optional), per_feature (optional), contrastive_weight (optional), backbone (optional,
    'towers'; 'multiway' is `mmjax.models.multiway_classifier.build_multiway_classifier`'s)} -> FusionClassifier.

    contrastive_weight > 0 adds the contrastive projection heads (model.embed_dim wide) and the temperature
    (model.logit_scale_init / logit_scale_max)."""
    fusion = _section(model_cfg, 'fusion', FUSION_KEYS)
    backbone = fusion.pop('backbone', 'towers')
    if backbone != 'towers':
        raise ValueError(f"build_fusion_classifier builds model.fusion.backbone='towers'; got {backbone!r}")
    if fusion['mode'] not in FUSION_MODES:
        raise ValueError(f'config model.fusion.mode must be one of {FUSION_MODES}; got {fusion["mode"]!r}')
    if float(fusion.pop('contrastive_weight', 0.0)) > 0:
        scale_max = model_cfg.get('logit_scale_max', None)
        fusion.update(embed_dim=int(model_cfg.embed_dim), logit_scale_init=float(model_cfg.logit_scale_init),
                      logit_scale_max=None if scale_max is None else float(scale_max))
    return FusionClassifier(
        image_kwargs=encoder_kwargs(model_cfg, 'image'), text_kwargs=encoder_kwargs(model_cfg, 'text'),
        activation=str(model_cfg.get('activation', 'gelu') or 'gelu'),
        dtype=jnp.dtype(model_cfg.get('dtype', 'float32')),
        param_dtype=jnp.dtype(model_cfg.get('param_dtype', 'float32')), **fusion)


# --------------------------------------------------------------------------------------------- ITM / MLM

class ItmMlmHeads(nn.Module):
    """Image-conditioned text encoder with ITM and MLM heads (ALBEF-style multimodal layers).

    Each of `num_layers` layers: CrossAttention (text queries, image keys/values; params 'cross_{i}') then an
    EncoderBlock (bidirectional self-attention with the text padding mask, and MLP; 'block_{i}'); final LN.
    ITM: Dense(1) on the fused token at position 0 ('cls') or at the last valid token ('eot').
    MLM: Dense(width) + GELU + LN transform, then Dense to vocab rows (rounded up to `vocab_multiple`, sliced
    back to `vocab_size`). `width` is the text tokens' width Wt.
    """
    vocab_size: int
    width: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    pool: str = 'eot'
    vocab_multiple: int = 128
    activation: str = 'gelu'
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        if self.pool not in ('eot', 'cls'):
            raise ValueError(f"model.itm_mlm.pool must be 'eot' or 'cls'; got {self.pool!r}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.cross = [CrossAttention(self.num_heads, **kw) for _ in range(self.num_layers)]
        self.block = [EncoderBlock(self.num_heads, self.mlp_dim, self.activation, **kw)
                      for _ in range(self.num_layers)]
        self.ln_final = layer_norm(**kw)
        self.itm_head = dense(1, ('embed', None), **kw)
        self.mlm_hidden = dense(self.width, ('embed', 'mlp'), **kw)
        rows = -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple
        self.mlm_ln = layer_norm(**kw)
        self.mlm_out = dense(rows, ('embed', 'vocab'), **kw)

    def fuse(self, image_tokens: jax.Array, text_tokens: jax.Array, text_mask: jax.Array,
             image_mask: jax.Array | None = None) -> jax.Array:
        """image_tokens [B,N,Wi], text_tokens [B,L,Wt], text_mask bool [B,L], image_mask bool [B,N] | None
        -> fused text tokens [B,L,Wt] (Wt must equal `width`)."""
        if text_tokens.shape[-1] != self.width:
            raise ValueError(f'ItmMlmHeads: text tokens have width {text_tokens.shape[-1]}, expected width '
                             f'{self.width} (model.text.width)')
        x = constrain(text_tokens.astype(self.dtype), ACT_TOKENS)
        self_mask = text_mask.astype(bool)[:, None, None, :]
        for cross, block in zip(self.cross, self.block):
            x = cross(x, image_tokens, image_mask)
            x = block(x, self_mask)
        return constrain(self.ln_final(x), ACT_TOKENS)

    def itm(self, fused: jax.Array, text_mask: jax.Array) -> jax.Array:
        """fused [B,L,W], text_mask bool [B,L] -> ITM logits float32 [B] (match vs no match)."""
        if self.pool == 'cls':
            token = fused[:, 0]
        else:
            index = last_nonpad_index(text_mask.astype(jnp.int32))
            token = jnp.take_along_axis(fused, index[:, None, None], axis=1)[:, 0]
        return self.itm_head(constrain(token, ACT_POOLED))[:, 0].astype(jnp.float32)

    def mlm(self, fused: jax.Array) -> jax.Array:
        """fused [B,L,W] -> MLM logits float32 [B,L,vocab_size]."""
        h = activation_fn(self.activation)(self.mlm_hidden(fused))
        h = self.mlm_ln(constrain(h, ('act_batch', 'act_length', 'act_mlp')))
        logits = self.mlm_out(h)[..., :self.vocab_size]
        return constrain(logits.astype(jnp.float32), ('act_batch', 'act_length', None))

    def __call__(self, image_tokens: jax.Array, text_tokens: jax.Array, text_mask: jax.Array,
                 image_mask: jax.Array | None = None) -> dict[str, jax.Array]:
        """-> {'fused': [B,L,Wt], 'itm_logits': float32 [B], 'mlm_logits': float32 [B,L,vocab_size]}."""
        fused = self.fuse(image_tokens, text_tokens, text_mask, image_mask)
        return {'fused': fused, 'itm_logits': self.itm(fused, text_mask), 'mlm_logits': self.mlm(fused)}


class ContrastiveItmMlmModel(ContrastiveModel):
    """ContrastiveModel plus ITM/MLM heads (params 'itm_mlm'; the contrastive params are unchanged, so a
    contrastive checkpoint is a subset of this model's params).

    `heads_kwargs`: ItmMlmHeads fields as sorted (key, value) pairs (dtype/param_dtype come from the model).
    """
    heads_kwargs: Kwargs = ()

    def setup(self):
        super().setup()
        self.itm_mlm = ItmMlmHeads(**dict(self.heads_kwargs), dtype=self.dtype, param_dtype=self.param_dtype)

    def __call__(self, batch: dict[str, jax.Array], train: bool = False) -> dict[str, Any]:
        """batch {'image': float32 [B,H,W,C], 'text': int32 [B,L], optional 'mlm_text': int32 [B,L] (the text
        with MLM masking, see objectives.mask_tokens)} -> the ContrastiveModel outputs plus
          'itm_logits_pos' float32 [B]: ITM logits of the matching pairs,
          'itm_logits_neg' float32 [2B]: each image with a hard negative text, then each text with a hard
              negative image (itm_negatives on logit_scale * image·text similarity; sampled with the
              'itm' rng when given, else the hardest negative),
          'mlm_logits' float32 [B,L,V]: vocabulary logits of the image-fused 'mlm_text' (or 'text' when absent).
        """
        del train
        outputs = self.tower_outputs({k: batch[k] for k in ('image', 'text')})
        img, txt = outputs['image'], outputs['text']
        text_mask = batch['text'] != PAD_ID
        sim = jax.lax.stop_gradient(self.scale * (img['embedding'] @ txt['embedding'].T))
        rngs = jax.random.split(self.make_rng('itm')) if self.has_rng('itm') else (None, None)
        neg_text = itm_negatives(sim, rngs[0])  # [B] a text index per image
        neg_image = itm_negatives(sim.T, rngs[1])  # [B] an image index per text
        heads = self.itm_mlm
        # One fused pass over [positives; image + negative text; negative image + text] (3B pairs).
        image_tokens = jnp.concatenate([img['tokens'], img['tokens'], img['tokens'][neg_image]])
        text_tokens = jnp.concatenate([txt['tokens'], txt['tokens'][neg_text], txt['tokens']])
        mask = jnp.concatenate([text_mask, text_mask[neg_text], text_mask])
        itm_logits = heads.itm(heads.fuse(image_tokens, text_tokens, mask), mask)
        b = text_mask.shape[0]
        logits_pos, logits_neg = itm_logits[:b], itm_logits[b:]
        if 'mlm_text' in batch:
            mlm_tokens, _ = self.tower_modules['text'].encoder(batch['mlm_text'])
        else:
            mlm_tokens = txt['tokens']
        mlm_logits = heads.mlm(heads.fuse(img['tokens'], mlm_tokens, text_mask))
        result = {'embeddings': {name: out['embedding'] for name, out in outputs.items()},
                  'logit_scale': self.scale, 'itm_logits_pos': logits_pos, 'itm_logits_neg': logits_neg,
                  'mlm_logits': mlm_logits}
        if self.bias is not None:
            result['logit_bias'] = self.bias
        return result

    def pair_logits(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """Scores given (image, text) pairs, for evaluation.

        batch {'image': float32 [B,H,W,C], 'text': int32 [B,L], optional 'mlm_text': int32 [B,L]} ->
        {'itm_logits': float32 [B] (match logit of image i with text i),
         'mlm_logits': float32 [B,L,V] (of the image-fused 'mlm_text', or 'text' when absent)}.
        """
        outputs = self.tower_outputs({k: batch[k] for k in ('image', 'text')})
        img, txt = outputs['image'], outputs['text']
        text_mask = batch['text'] != PAD_ID
        heads = self.itm_mlm
        itm_logits = heads.itm(heads.fuse(img['tokens'], txt['tokens'], text_mask), text_mask)
        mlm_tokens = (self.tower_modules['text'].encoder(batch['mlm_text'])[0] if 'mlm_text' in batch
                      else txt['tokens'])
        return {'itm_logits': itm_logits, 'mlm_logits': heads.mlm(heads.fuse(img['tokens'], mlm_tokens, text_mask))}


ITM_MLM_KEYS = {'num_layers': None, 'num_heads': None, 'mlp_dim': None, 'pool': 'optional'}


def build_itm_mlm_model(model_cfg: ml_collections.ConfigDict) -> ContrastiveItmMlmModel:
    """`config.model` (as for build_model) plus section itm_mlm {num_layers, num_heads, mlp_dim, pool (optional,
    default model.text.pool)} -> ContrastiveItmMlmModel. MLM logits cover model.text.vocab_size ids."""
    base = build_model(model_cfg)
    heads = _section(model_cfg, 'itm_mlm', ITM_MLM_KEYS)
    text = dict(next(kw for n, _, kw in base.towers if n == 'text'))
    heads.setdefault('pool', text.get('pool', 'eot'))
    heads.update(vocab_size=text['vocab_size'], width=text['width'],
                 vocab_multiple=text.get('vocab_multiple', 128),
                 activation=text.get('activation', 'gelu'))
    return ContrastiveItmMlmModel(
        towers=base.towers, embed_dim=base.embed_dim, logit_scale_init=base.logit_scale_init,
        logit_scale_max=base.logit_scale_max, logit_bias_init=base.logit_bias_init, dtype=base.dtype,
        param_dtype=base.param_dtype, heads_kwargs=tuple(sorted(heads.items())))
