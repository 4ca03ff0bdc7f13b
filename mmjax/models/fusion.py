"""Fusion of two modalities: cross-attention, co-attention, feature fusion, Flamingo-style gated blocks.

Every attention here is `attention.MultiHeadAttention`; every parameter carries logical axis names (via the `layers`
helpers) and every module's output is constrained with `act_*` names.

Key-padding masks are bool with True = a real token (may be attended to); None = all tokens valid.

Feature fusion modules (`ConcatFusion`, `WeightedSumFusion`, `GatedFusion`) act on the last axis, so they fuse
pooled features [B,E] or aligned token features [B,L,E] alike; `CrossAttentionFusion` fuses token sequences of
different lengths. All four share the call signature `(a, b, a_mask=None, b_mask=None)`; `needs_tokens` says whether
a module wants token sequences (True) or pooled/aligned features (False). `build_fusion` makes one by mode name.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.attention import MultiHeadAttention
from mmjax.models.encoders import embed_text
from mmjax.models.layers import ACT_POOLED, ACT_TOKENS, Mlp, constrain, dense, layer_norm, partitioned, remat_module
from mmjax.models.transformer import EncoderBlock, take_rows

Dtype = Any
FUSION_MODES = ('concat', 'weighted', 'gated', 'xattn')
PROJ_OPTION = 'proj_dim (config model.fusion.proj_dim)'


def constrain_features(x: jax.Array) -> jax.Array:
    """Constrains pooled [B,E] or token [B,L,E] features with the matching activation names."""
    if x.ndim == 2:
        return constrain(x, ACT_POOLED)
    if x.ndim == 3:
        return constrain(x, ACT_TOKENS)
    raise ValueError(f'features must be [B,E] or [B,L,E]; got shape {x.shape}')


def key_mask(kv_mask: jax.Array | None) -> jax.Array | None:
    """Key-padding mask bool [B,Lk] -> attention mask [B,1,1,Lk] (None stays None)."""
    return None if kv_mask is None else kv_mask.astype(bool)[:, None, None, :]


def masked_mean(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """x [B,L,E], mask bool [B,L] | None -> [B,E]: mean over valid positions (an all-invalid row gives 0)."""
    if mask is None:
        return x.mean(axis=1)
    w = mask.astype(x.dtype)[..., None]
    return (x * w).sum(axis=1) / jnp.maximum(w.sum(axis=1), 1).astype(x.dtype)


class _Attend(nn.Module):
    """attn(ln_q(x), ln_kv(y)) without residual: x [B,La,Ea], y [B,Lb,Eb], y_mask [B,Lb] -> [B,La,Ea]."""
    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, y: jax.Array, y_mask: jax.Array | None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q = layer_norm(name='ln_q', **kw)(x)
        kv = layer_norm(name='ln_kv', **kw)(y)
        return MultiHeadAttention(self.num_heads, name='attn', **kw)(q, kv, key_mask(y_mask))


class CrossAttention(nn.Module):
    """Pre-LN cross-attention with residual: x + attn(ln(x), ln(y)), queries from x, keys/values from y.

    x [B,La,Ea] and y [B,Lb,Eb] may differ in width (the key/value projections map Eb to the heads).
    Heads have width Ea // num_heads.
    """
    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, y: jax.Array, y_mask: jax.Array | None = None) -> jax.Array:
        """x [B,La,Ea], y [B,Lb,Eb], y_mask bool [B,Lb] (True = valid key) | None -> [B,La,Ea]."""
        h = _Attend(self.num_heads, self.dtype, self.param_dtype, name='xattn')(x, y, y_mask)
        return constrain(x + h, ACT_TOKENS)


class MlpResidual(nn.Module):
    """Pre-LN MLP with residual: x + mlp(ln(x)), [B,L,E] -> [B,L,E]."""
    mlp_dim: int
    activation: str = 'gelu'
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = Mlp(self.mlp_dim, self.activation, name='mlp', **kw)(layer_norm(name='ln', **kw)(x))
        return constrain(x + h, ACT_TOKENS)


class CoAttention(nn.Module):
    """Bidirectional cross-attention layer: a attends to b and b attends to a, both from the layer's inputs.

    a' = CrossAttention(a, b, b_mask) (params 'a_to_b'), b' = CrossAttention(b, a, a_mask) (params 'b_to_a');
    with `mlp_dim` each side then gets a pre-LN MLP residual ('a_mlp', 'b_mlp'). Widths of a and b may differ.
    """
    num_heads: int
    mlp_dim: int | None = None
    activation: str = 'gelu'
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, a: jax.Array, b: jax.Array, a_mask: jax.Array | None = None,
                 b_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """a [B,La,Ea], b [B,Lb,Eb], masks bool [B,La] / [B,Lb] | None -> (a' [B,La,Ea], b' [B,Lb,Eb])."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        a_new = CrossAttention(self.num_heads, name='a_to_b', **kw)(a, b, b_mask)
        b_new = CrossAttention(self.num_heads, name='b_to_a', **kw)(b, a, a_mask)
        if self.mlp_dim is not None:
            a_new = MlpResidual(self.mlp_dim, self.activation, name='a_mlp', **kw)(a_new)
            b_new = MlpResidual(self.mlp_dim, self.activation, name='b_mlp', **kw)(b_new)
        return a_new, b_new


# --------------------------------------------------------------------------------------------- feature fusion

def _check_fusable(a: jax.Array, b: jax.Array, module: str) -> None:
    if a.shape[:-1] != b.shape[:-1]:
        raise ValueError(f'{module}: features must agree except in width; got {a.shape} and {b.shape} '
                         f'(use mode "xattn" to fuse token sequences of different lengths)')


def _common_width(module: nn.Module, a: jax.Array, b: jax.Array, name: str) -> tuple[jax.Array, jax.Array]:
    """Projects a and b to `module.proj_dim` (Dense 'proj_a'/'proj_b') when set; else checks equal widths."""
    _check_fusable(a, b, name)
    if module.proj_dim is None:
        if a.shape[-1] != b.shape[-1]:
            raise ValueError(f'{name}: cannot fuse features of mismatched widths {a.shape[-1]} and {b.shape[-1]} '
                             f'without a projection; set {PROJ_OPTION} to project both to one width')
        return a, b
    kw = dict(dtype=module.dtype, param_dtype=module.param_dtype)
    a = dense(module.proj_dim, ('embed', 'joint'), name='proj_a', **kw)(a)
    b = dense(module.proj_dim, ('embed', 'joint'), name='proj_b', **kw)(b)
    return constrain_features(a), constrain_features(b)


class ConcatFusion(nn.Module):
    """z = W [a; b] + c: concatenation along the width, then a linear projection.

    a [..., Ea], b [..., Eb] (same leading shape) -> [..., proj_dim]. Without `proj_dim` the output width is the
    common input width, so mismatched widths then raise ValueError.
    """
    proj_dim: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    needs_tokens: ClassVar[bool] = False

    @nn.compact
    def __call__(self, a: jax.Array, b: jax.Array, a_mask: jax.Array | None = None,
                 b_mask: jax.Array | None = None) -> jax.Array:
        """a [B,(L,)Ea], b [B,(L,)Eb] -> [B,(L,)proj_dim or E]. Masks are ignored (elementwise fusion)."""
        del a_mask, b_mask
        _check_fusable(a, b, 'ConcatFusion')
        if self.proj_dim is None and a.shape[-1] != b.shape[-1]:
            raise ValueError(f'ConcatFusion: cannot fuse features of mismatched widths {a.shape[-1]} and '
                             f'{b.shape[-1]} without an output width; set {PROJ_OPTION}')
        width = self.proj_dim or a.shape[-1]
        z = jnp.concatenate([a.astype(self.dtype), b.astype(self.dtype)], axis=-1)
        z = dense(width, ('embed', 'joint'), name='proj', dtype=self.dtype, param_dtype=self.param_dtype)(z)
        return constrain_features(z)


class WeightedSumFusion(nn.Module):
    """z = α a + (1 − α) b with α = sigmoid(w), w learned (init 0, so α = 0.5 at init).

    `per_feature=True`: w has shape [E] (logical ('embed',)); False: a scalar (logical ()). α is sown as
    intermediates['alpha']. Mismatched widths need `proj_dim` (both inputs are then projected first).
    """
    proj_dim: int | None = None
    per_feature: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    needs_tokens: ClassVar[bool] = False

    @nn.compact
    def __call__(self, a: jax.Array, b: jax.Array, a_mask: jax.Array | None = None,
                 b_mask: jax.Array | None = None) -> jax.Array:
        """a, b [B,(L,)E] (or any widths with proj_dim) -> [B,(L,)E']; α ∈ (0,1) of shape [E'] or []."""
        del a_mask, b_mask
        a, b = _common_width(self, a, b, 'WeightedSumFusion')
        shape, names = ((a.shape[-1],), ('embed',)) if self.per_feature else ((), ())
        w = self.param('alpha_logit', partitioned(nn.initializers.zeros_init(), names), shape, self.param_dtype)
        alpha = jax.nn.sigmoid(jnp.asarray(w, jnp.float32))
        self.sow('intermediates', 'alpha', alpha)
        alpha = alpha.astype(self.dtype)
        z = alpha * a.astype(self.dtype) + (1 - alpha) * b.astype(self.dtype)
        return constrain_features(z)


class GatedFusion(nn.Module):
    """g = σ(W [a; b] + c), z = g ⊙ a + (1 − g) ⊙ b: an input-dependent, per-feature convex combination.

    z lies element-wise between a and b. The gate is sown as intermediates['gate'].
    Mismatched widths need `proj_dim` (both inputs are then projected first).
    """
    proj_dim: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    needs_tokens: ClassVar[bool] = False

    @nn.compact
    def __call__(self, a: jax.Array, b: jax.Array, a_mask: jax.Array | None = None,
                 b_mask: jax.Array | None = None) -> jax.Array:
        """a, b [B,(L,)E] (or any widths with proj_dim) -> [B,(L,)E']."""
        del a_mask, b_mask
        a, b = _common_width(self, a, b, 'GatedFusion')
        a, b = a.astype(self.dtype), b.astype(self.dtype)
        logits = dense(a.shape[-1], ('embed', 'joint'), name='gate_proj', dtype=self.dtype,
                       param_dtype=self.param_dtype)(jnp.concatenate([a, b], axis=-1))
        g = jax.nn.sigmoid(logits.astype(jnp.float32))
        self.sow('intermediates', 'gate', g)
        g = g.astype(self.dtype)
        return constrain_features(g * a + (1 - g) * b)


class CrossAttentionFusion(nn.Module):
    """Cross-attention fusion of token sequences: a's tokens attend to b's, then a masked mean over a.

    a [B,La,Ea], b [B,Lb,Eb] -> LN(masked_mean(CrossAttention(a, b, b_mask), a_mask)) [B,Ea], then a projection to
    `proj_dim` when set.
    """
    num_heads: int
    proj_dim: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    needs_tokens: ClassVar[bool] = True

    @nn.compact
    def __call__(self, a: jax.Array, b: jax.Array, a_mask: jax.Array | None = None,
                 b_mask: jax.Array | None = None) -> jax.Array:
        """a [B,La,Ea], b [B,Lb,Eb], masks bool [B,La] / [B,Lb] | None -> [B, proj_dim or Ea]."""
        if a.ndim != 3 or b.ndim != 3:
            raise ValueError(f'CrossAttentionFusion fuses token sequences [B,L,E]; got {a.shape} and {b.shape}')
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = CrossAttention(self.num_heads, name='cross', **kw)(a, b, b_mask)
        z = layer_norm(name='ln', **kw)(masked_mean(x, a_mask))
        if self.proj_dim is not None:
            z = dense(self.proj_dim, ('embed', 'joint'), name='proj', **kw)(z)
        return constrain(z, ACT_POOLED)


def build_fusion(mode: str, *, proj_dim: int | None = None, num_heads: int | None = None,
                 per_feature: bool = True, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                 name: str | None = None) -> nn.Module:
    """Fusion module for `mode` in FUSION_MODES; all share `__call__(a, b, a_mask=None, b_mask=None)`.

    'concat' -> ConcatFusion, 'weighted' -> WeightedSumFusion (per_feature), 'gated' -> GatedFusion,
    'xattn' -> CrossAttentionFusion (needs num_heads; fuses token sequences).
    """
    kw = dict(proj_dim=proj_dim, dtype=dtype, param_dtype=param_dtype, name=name)
    if mode == 'concat':
        return ConcatFusion(**kw)
    if mode == 'weighted':
        return WeightedSumFusion(per_feature=per_feature, **kw)
    if mode == 'gated':
        return GatedFusion(**kw)
    if mode == 'xattn':
        if not num_heads:
            raise ValueError("fusion mode 'xattn' needs num_heads (config model.fusion.num_heads)")
        return CrossAttentionFusion(num_heads, **kw)
    raise ValueError(f'unknown fusion mode {mode!r} (config model.fusion.mode); choose one of {FUSION_MODES}')


# --------------------------------------------------------------------------------------------- Flamingo gating

class GatedCrossAttentionBlock(nn.Module):
    """Flamingo's tanh-gated cross-attention block:

        x = x + tanh(α_attn) · attn(ln(x), ln(y));   x = x + tanh(α_ff) · mlp(ln(x))

    α_attn ('attn_gate') and α_ff ('ff_gate') are scalars (logical ()) initialised at 0, so the block is exactly the
    identity at init and a pretrained tower it is inserted into is unchanged.
    """
    num_heads: int
    mlp_dim: int
    activation: str = 'gelu'
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, y: jax.Array, y_mask: jax.Array | None = None) -> jax.Array:
        """x [B,L,E], y [B,M,Ey], y_mask bool [B,M] | None -> [B,L,E]."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        gate = lambda n: jnp.tanh(jnp.asarray(  # noqa: E731
            self.param(n, partitioned(nn.initializers.zeros_init(), ()), (), self.param_dtype), self.dtype))
        h = _Attend(self.num_heads, name='xattn', **kw)(x, y, y_mask)
        x = constrain(x + gate('attn_gate') * h, ACT_TOKENS)
        h = Mlp(self.mlp_dim, self.activation, name='mlp', **kw)(layer_norm(name='ln_mlp', **kw)(x))
        return constrain(x + gate('ff_gate') * h, ACT_TOKENS)


class InterleavedEncoder(nn.Module):
    """`depth` EncoderBlocks ('block_{i}', as in transformer.Encoder) with a GatedCrossAttentionBlock ('xattn_{i}')
    after every `every`-th block (after block i when (i + 1) % every == 0)."""
    depth: int
    num_heads: int
    mlp_dim: int
    every: int
    xattn_heads: int
    xattn_mlp_dim: int
    remat: str = 'none'
    activation: str = 'gelu'
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None, context: jax.Array,
                 context_mask: jax.Array | None) -> jax.Array:
        """x [B,L,E], self-attention mask [B,1|H,L,L] | None, context [B,M,Ec], context_mask [B,M] -> [B,L,E]."""
        if self.every < 1:
            raise ValueError(f'xattn_every must be >= 1; got {self.every}')
        block_cls = remat_module(EncoderBlock, self.remat)
        xattn_cls = remat_module(GatedCrossAttentionBlock, self.remat)
        kw = dict(activation=self.activation, dtype=self.dtype, param_dtype=self.param_dtype)
        x = constrain(x, ACT_TOKENS)
        for i in range(self.depth):
            x = block_cls(self.num_heads, self.mlp_dim, name=f'block_{i}', **kw)(x, mask)
            if (i + 1) % self.every == 0:
                x = xattn_cls(self.xattn_heads, self.xattn_mlp_dim, name=f'xattn_{i}', **kw)(
                    x, context, context_mask)
        return x


class GatedXAttnTextEncoder(nn.Module):
    """encoders.TextTransformer with a tanh-gated cross-attention block to `context` after every k-th layer.

    Same fields, param names and semantics as TextTransformer, whose input (`encoders.embed_text`) it shares (so
    its params load unchanged: the extra params are 'transformer/xattn_{i}'); at init it computes exactly what
    TextTransformer computes. Extra fields: xattn_every (k), xattn_heads (default num_heads), xattn_mlp_dim
    (default mlp_dim). No scan (blocks differ), no prompts, adapters or LoRA.
    """
    vocab_size: int
    max_len: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    xattn_every: int = 1
    xattn_heads: int | None = None
    xattn_mlp_dim: int | None = None
    causal: bool = True
    pool: str = 'eot'
    vocab_multiple: int = 128
    remat: str = 'none'
    activation: str = 'gelu'
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, context: jax.Array, context_mask: jax.Array | None = None,
                 valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """tokens int32 [B,L], context [B,M,Ec], context_mask bool [B,M] | None, valid bool [B,L] | None
        (default tokens != 0) -> (tokens [B,L,width], pooled [B,width])."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x, mask, index = embed_text(self, tokens, valid)
        x = InterleavedEncoder(self.depth, self.num_heads, self.mlp_dim, self.xattn_every,
                               self.xattn_heads or self.num_heads, self.xattn_mlp_dim or self.mlp_dim,
                               remat=self.remat, activation=self.activation, name='transformer',
                               **kw)(x, mask, context, context_mask)
        x = constrain(layer_norm(name='ln_final', **kw)(x), ACT_TOKENS)
        return x, constrain(take_rows(x, index)[:, 0], ACT_POOLED)
