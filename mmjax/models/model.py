"""Contrastive model: a dict of modality towers (encoder + projection head) plus temperature/bias.

Towers are built by name from config sections (`model.image`, `model.text`, ...). A new modality is one entry in
`ENCODERS` (module class + batch key) and one config section; the model code does not change.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mmjax.models.audio import AudioTransformer
from mmjax.models.encoders import TextTransformer, ViT
from mmjax.models.heads import ProjectionHead, l2_normalize, logit_bias, logit_scale

Dtype = Any

# Config section / batch key -> encoder module class. The batch key equals the section name.
ENCODERS: dict[str, type[nn.Module]] = {'image': ViT, 'text': TextTransformer, 'audio': AudioTransformer}

# Tower-section keys read by the data layer, not the encoder (e.g. which tokenizer feeds the text tower).
_DATA_FIELDS = ('tokenizer', 'tokenizer_path')

# Encoder fields taken from `config.model` itself unless the tower's section sets them.
_MODEL_LEVEL_FIELDS = ('remat', 'scan_layers', 'activation', 'dtype', 'param_dtype')


class Tower(nn.Module):
    """One modality: encoder (params under 'encoder') and projection head (param 'head/kernel')."""
    encoder_cls: type[nn.Module]
    encoder_kwargs: tuple[tuple[str, Any], ...]
    embed_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self.encoder = self.encoder_cls(**dict(self.encoder_kwargs), name='encoder')
        self.head = ProjectionHead(self.embed_dim, dtype=self.dtype, param_dtype=self.param_dtype, name='head')

    def __call__(self, x: jax.Array, return_tokens: bool = True) -> dict[str, jax.Array]:
        """x: the modality input -> {'tokens' [B,N,W], 'pooled' [B,W] (model dtype),
        'embedding' [B,D] float32 unit-norm}. return_tokens=False leaves 'tokens' out, and the encoder skips
        the last block's work on the tokens that do not feed the pooled features."""
        tokens, pooled = self.encoder(x, return_tokens=return_tokens)
        out = {'pooled': pooled, 'embedding': l2_normalize(self.head(pooled))}
        return {'tokens': tokens, **out} if return_tokens else out


class ContrastiveModel(nn.Module):
    """Dual (or N-) tower contrastive model.

    Attributes:
      towers: ((name, encoder class, encoder kwargs as sorted (key, value) tuples), ...); params under `name`.
      embed_dim: joint embedding width D.
      logit_scale_init / logit_scale_max: log-space temperature init and clip (None: no clip).
      logit_bias_init: None, or the init of a learned 'logit_bias' scalar (SigLIP).
    """
    dual_encoder: ClassVar[bool] = True  # encode_image / encode_text: the dual-encoder evaluators apply
    towers: tuple[tuple[str, type[nn.Module], tuple[tuple[str, Any], ...]], ...]
    embed_dim: int
    logit_scale_init: float
    logit_scale_max: float | None = None
    logit_bias_init: float | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self.tower_modules = {
            name: Tower(cls, kwargs, self.embed_dim, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
            for name, cls, kwargs in self.towers}
        self.scale = logit_scale(self, self.logit_scale_init, self.logit_scale_max, self.param_dtype)
        self.bias = (None if self.logit_bias_init is None
                     else logit_bias(self, self.logit_bias_init, self.param_dtype))

    def tower_outputs(self, batch: dict[str, jax.Array],
                      return_tokens: bool = True) -> dict[str, dict[str, jax.Array]]:
        """Runs every tower whose input key is in `batch`: {name: Tower outputs} (see `Tower`)."""
        present = [name for name, _, _ in self.towers if name in batch]
        if not present:
            raise ValueError(f'batch has none of the model inputs {[n for n, _, _ in self.towers]}; '
                             f'got keys {sorted(batch)}')
        return {name: self.tower_modules[name](batch[name], return_tokens) for name in present}

    def __call__(self, batch: dict[str, jax.Array], train: bool = False) -> dict[str, Any]:
        """batch {'image': float32 [B,H,W,C], 'text': int32 [B,L], ...} (any subset of towers) ->
        {'embeddings': {name: float32 [B,D] unit-norm}, 'logit_scale': float32 [] (exp'd, clipped),
         'logit_bias': float32 [] (only when configured)}. `train` is accepted for API symmetry (no dropout)."""
        del train
        outputs = self.tower_outputs(batch, return_tokens=False)  # the losses read the embeddings only
        result = {'embeddings': {name: out['embedding'] for name, out in outputs.items()},
                  'logit_scale': self.scale}
        if self.bias is not None:
            result['logit_bias'] = self.bias
        return result

    def encode(self, name: str, x: jax.Array) -> jax.Array:
        """Tower `name` on its input -> float32 [B,D] unit-norm."""
        return self.tower_modules[name](x, return_tokens=False)['embedding']

    def encode_image(self, images: jax.Array) -> jax.Array:
        """images float32 [B,H,W,C] -> float32 [B,D] unit-norm."""
        return self.encode('image', images)

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        """tokens int32 [B,L] -> float32 [B,D] unit-norm."""
        return self.encode('text', tokens)


def _require(cfg: ml_collections.ConfigDict, key: str, where: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise ValueError(f'config {where}.{key} is required')
    return cfg[key]


def encoder_kwargs(model_cfg: ml_collections.ConfigDict, name: str) -> tuple[tuple[str, Any], ...]:
    """Plain, hashable encoder kwargs from `model_cfg[name]` plus the model-level fields."""
    cls = ENCODERS[name]
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in ('parent', 'name')}
    kwargs = {key: model_cfg[key] for key in _MODEL_LEVEL_FIELDS if key in model_cfg and model_cfg[key] is not None}
    section = model_cfg[name]
    section = section.to_dict() if isinstance(section, ml_collections.ConfigDict) else dict(section)
    for key, value in section.items():  # a tower's own section overrides the model-level fields
        if key in _DATA_FIELDS:
            continue
        if key not in fields:
            raise ValueError(f'unknown key model.{name}.{key}; allowed: {sorted(fields)}')
        kwargs[key] = tuple(value) if isinstance(value, list) else value
    for key in ('dtype', 'param_dtype'):
        kwargs[key] = jnp.dtype(kwargs.get(key, 'float32'))
    missing = [k for k, f in fields.items()
               if k not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f'config model.{name} is missing keys {missing}')
    return tuple(sorted(kwargs.items()))


def build_model(model_cfg: ml_collections.ConfigDict) -> ContrastiveModel:
    """`config.model` -> ContrastiveModel with one tower per name in `model_cfg.towers` (default: every present
    section of `ENCODERS`), in `ENCODERS` order, so adding a tower leaves the other towers' parameters unchanged."""
    names = model_cfg.get('towers', None)
    if names is None:
        names = [name for name in ENCODERS if name in model_cfg and model_cfg[name] is not None]
    unknown = [n for n in names if n not in ENCODERS or n not in model_cfg or model_cfg[n] is None]
    if unknown:
        raise ValueError(f'config.model.towers names {unknown}, which have no encoder / config section; '
                         f'known: {list(ENCODERS)}')
    towers = tuple((name, ENCODERS[name], encoder_kwargs(model_cfg, name)) for name in ENCODERS if name in names)
    if len(towers) < 2:
        raise ValueError(f'config.model needs at least two towers among {list(ENCODERS)}; '
                         f'got {[t[0] for t in towers]}')
    bias_init = model_cfg.get('logit_bias_init', None)
    scale_max = model_cfg.get('logit_scale_max', None)
    return ContrastiveModel(
        towers=towers,
        embed_dim=int(_require(model_cfg, 'embed_dim', 'model')),
        logit_scale_init=float(_require(model_cfg, 'logit_scale_init', 'model')),
        logit_scale_max=None if scale_max is None else float(scale_max),
        logit_bias_init=None if bias_init is None else float(bias_init),
        dtype=jnp.dtype(model_cfg.get('dtype', 'float32')),
        param_dtype=jnp.dtype(model_cfg.get('param_dtype', 'float32')),
    )
