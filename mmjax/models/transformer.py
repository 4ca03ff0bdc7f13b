"""The pre-LN transformer block and the encoder stack (unrolled or scanned, optional remat) built from it."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.attention import MultiHeadAttention
from mmjax.models.layers import (
    ACT_POOLED,
    ACT_TOKENS,
    REMAT_POLICIES,
    Adapter,
    Mlp,
    constrain,
    layer_norm,
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


class EncoderBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x)).

    With `scan_carry=True` the call returns `(x, None)` so the block can be the body of `nn.scan`.
    Fine-tuning fields (all off by default, leaving the parameter tree unchanged): `adapter_dim` > 0 adds
    zero-initialised `Adapter`s 'adapter_attn' / 'adapter_mlp' on the attention and MLP outputs (before the
    residual add); `lora_*` add LoRA to the attention/MLP projections matching `lora_targets` (see
    `layers.Dense`).
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

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None, query_index: jax.Array | None = None):
        """x [B,L,E], mask bool [B|1,1|H,L|1,L] or None -> [B,L,E] (or `(x, None)` when `scan_carry`).

        `query_index` int [B]: compute only token `query_index[b]` of each sequence, attending to all L keys, ->
        [B,1,E], equal to the full block's output at that token (what a pooled-only last block needs: its
        other tokens feed nothing). Keys and values are still projected for every token.
        """
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        lora = dict(lora_rank=self.lora_rank, lora_alpha=self.lora_alpha, lora_targets=self.lora_targets)
        h = layer_norm(name='ln_attn', **kw)(x)
        h_kv = None
        if query_index is not None:
            x, h_kv, h = take_rows(x, query_index), h, take_rows(h, query_index)
            mask = None if mask is None else query_mask_rows(mask, query_index)
        h = MultiHeadAttention(self.num_heads, name='attn', **lora, **kw)(h, h_kv, mask)
        if self.adapter_dim > 0:
            h = Adapter(self.adapter_dim, self.activation, name='adapter_attn', **kw)(h)
        x = constrain(x + h, ACT_TOKENS)
        h = layer_norm(name='ln_mlp', **kw)(x)
        h = Mlp(self.mlp_dim, self.activation, name='mlp', **lora, **kw)(h)
        if self.adapter_dim > 0:
            h = Adapter(self.adapter_dim, self.activation, name='adapter_mlp', **kw)(h)
        x = constrain(x + h, ACT_TOKENS)
        return (x, None) if self.scan_carry else x


class Encoder(nn.Module):
    """Stack of `depth` identical `EncoderBlock`s.

    Params live under 'block_{i}' (unrolled) or under 'blocks' with a leading 'layers' axis of size `depth`
    (`scan=True`). `remat` is 'none' | 'full' | 'dots' (jax.checkpoint per block; 'dots' saves matmul outputs).
    adapter_dim / lora_*: passed to every block (see `EncoderBlock`).
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

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None,
                 query_index: jax.Array | None = None) -> jax.Array:
        """x [B,L,E], mask bool [B|1,1|H,L,L] or None -> [B,L,E].

        With `query_index` int [B] the last block computes only token `query_index[b]` (see `EncoderBlock`)
        -> [B,1,E]: the pooled token of a tower whose other outputs are not used. Every earlier block runs in
        full, since the last one attends to all of their tokens.
        """
        block_cls = remat_module(EncoderBlock, self.remat, prevent_cse=not self.scan)
        kw = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, activation=self.activation,
                  dtype=self.dtype, param_dtype=self.param_dtype, adapter_dim=self.adapter_dim,
                  lora_rank=self.lora_rank, lora_alpha=self.lora_alpha, lora_targets=self.lora_targets)
        x = constrain(x, ACT_TOKENS)
        if self.scan:
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
        for i in range(self.depth):
            last = query_index is not None and i == self.depth - 1
            x = block_cls(name=f'block_{i}', **kw)(x, mask, query_index if last else None)
        return x


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
