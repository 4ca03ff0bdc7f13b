"""Projection heads and the learned scalars (temperature, bias) of contrastive models."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.layers import constrain, partitioned

Dtype = Any


class ProjectionHead(nn.Module):
    """Linear map (no bias) from encoder width to the joint embedding: [B,E] -> [B,embed_dim].

    Kernel 'kernel' has logical axes ('embed', 'joint') and is initialised N(0, E**-0.5) as in CLIP.
    """
    embed_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B,E] -> [B,embed_dim] in `dtype`."""
        width = x.shape[-1]
        kernel = self.param('kernel', partitioned(nn.initializers.normal(width ** -0.5), ('embed', 'joint')),
                            (width, self.embed_dim), self.param_dtype)
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        return constrain(y, ('act_batch', 'act_joint'))


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """x [..., D] -> float32 [..., D] with unit L2 norm along the last axis."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def learned_scalar(module: nn.Module, name: str, init_value: float, param_dtype: Dtype = jnp.float32) -> jax.Array:
    """Creates (or reads) the scalar param `name` of `module` (logical names `()`), returned as float32 []."""
    p = module.param(name, partitioned(nn.initializers.constant(init_value), ()), (), param_dtype)
    return jnp.asarray(p, jnp.float32)


def logit_scale(module: nn.Module, init_log: float, max_log: float | None,
                param_dtype: Dtype = jnp.float32) -> jax.Array:
    """Temperature: param 'logit_scale' stored in log space; returns exp(min(param, max_log)) float32 []."""
    log_scale = learned_scalar(module, 'logit_scale', init_log, param_dtype)
    if max_log is not None:
        log_scale = jnp.minimum(log_scale, max_log)
    return jnp.exp(log_scale)


def logit_bias(module: nn.Module, init_value: float, param_dtype: Dtype = jnp.float32) -> jax.Array:
    """SigLIP bias: param 'logit_bias' returned as float32 []."""
    return learned_scalar(module, 'logit_bias', init_value, param_dtype)
