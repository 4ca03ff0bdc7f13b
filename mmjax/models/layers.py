"""Transformer building blocks with logical partitioning on every parameter.

Every parameter is created through `nn.with_logical_partitioning` with names from the project vocabulary
(`embed`, `mlp`, `heads`, `kv`, `vocab`, `patch`, `length`, `joint`, `layers`); activations are constrained with
`act_*` names. Compute runs in `dtype`, parameters are stored in `param_dtype`.

Attention lives in `mmjax.models.attention`, the transformer block and encoder stack in `mmjax.models.transformer`.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Initializer = Callable[..., jax.Array]

ACT_TOKENS = ('act_batch', 'act_length', 'act_embed')
ACT_HEADS = ('act_batch', 'act_length', 'act_heads', 'act_kv')
ACT_MLP = ('act_batch', 'act_length', 'act_mlp')
ACT_POOLED = ('act_batch', 'act_embed')

REMAT_POLICIES = {
    'full': None,  # save nothing, recompute the whole block
    'dots': jax.checkpoint_policies.checkpoint_dots,
}

default_kernel_init = nn.initializers.lecun_normal()


def remat_module(cls: type[nn.Module], remat: str, prevent_cse: bool = True) -> type[nn.Module]:
    """`cls` under `nn.remat` with policy `REMAT_POLICIES[remat]` (config `model.remat`); 'none' returns `cls`."""
    if remat == 'none':
        return cls
    if remat not in REMAT_POLICIES:
        raise ValueError(f"model.remat must be one of 'none', {sorted(REMAT_POLICIES)}; got {remat!r}")
    return nn.remat(cls, policy=REMAT_POLICIES[remat], prevent_cse=prevent_cse)


def partitioned(init: Initializer, names: Sequence[str]) -> Initializer:
    """`init` whose value is boxed as `nn.LogicallyPartitioned` with logical axis `names`."""
    return nn.with_logical_partitioning(init, tuple(names))


def strip_boxes(tree):
    """Replaces logical-axis boxes by their values, without the sharding constraint `nn.unbox` adds
    (which needs a trace; this also works on abstract trees)."""
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
    return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if is_box(x) else x, tree,
                        is_leaf=is_box)


def _flat_init(init: Initializer, n_in: int) -> Initializer:
    """Applies a 2-D initializer (fan_in x fan_out) to a kernel whose first `n_in` axes are inputs."""
    def fn(key, shape, dtype=jnp.float32):
        fan_in = math.prod(shape[:n_in])
        return init(key, (fan_in, math.prod(shape[n_in:])), dtype).reshape(shape)
    return fn


class Dense(nn.Module):
    """Linear map contracting the trailing `axis` dims of x with a kernel [*in_dims, *features].

    The kernel has logical axes `names` (input axes then output axes); the bias gets the output axes.
    (Own implementation rather than nn.DenseGeneral: that one boxes a flattened kernel during init, which breaks
    its logical constraint under an active mesh.)
    """
    features: int | tuple[int, ...]
    names: tuple[str, ...]
    axis: int | tuple[int, ...] = -1
    use_bias: bool = True
    kernel_init: Initializer = default_kernel_init
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora_rank: int = 0  # > 0: adds (lora_alpha / lora_rank) * x A B; A 'lora_a' [*in_dims, r], B 'lora_b' [r, *features]
    lora_alpha: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., *in_dims] -> [..., *features] in `dtype`.

        With `lora_rank` r > 0 the output gains (lora_alpha / r) * (x A) B, B zero-initialised (so the map
        equals the base one at init); A has logical axes (*input names, 'lora'), B ('lora', *output names).
        """
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        axes = sorted(a % x.ndim for a in ((self.axis,) if isinstance(self.axis, int) else self.axis))
        if axes != list(range(x.ndim - len(axes), x.ndim)):
            raise ValueError(f'Dense contracts trailing axes only; got axis={self.axis} for rank {x.ndim}')
        if len(self.names) != len(axes) + len(features):
            raise ValueError(f'names {self.names} do not match {len(axes)} input and {len(features)} output axes')
        in_shape = tuple(x.shape[a] for a in axes)
        kernel = self.param('kernel', partitioned(_flat_init(self.kernel_init, len(axes)), self.names),
                            in_shape + features, self.param_dtype)
        x = x.astype(self.dtype)
        y = _matmul(x, kernel.astype(self.dtype), len(axes))
        if self.lora_rank > 0:
            n_in, r = len(axes), self.lora_rank
            a = self.param('lora_a', partitioned(_flat_init(self.kernel_init, n_in), self.names[:n_in] + ('lora',)),
                           in_shape + (r,), self.param_dtype)
            b = self.param('lora_b', partitioned(nn.initializers.zeros_init(), ('lora',) + self.names[n_in:]),
                           (r,) + features, self.param_dtype)
            delta = _matmul(_matmul(x, a.astype(self.dtype), n_in), b.astype(self.dtype), 1)
            y = y + jnp.asarray(self.lora_alpha / r, self.dtype) * delta
        if self.use_bias:
            bias = self.param('bias', partitioned(nn.initializers.zeros_init(), self.names[len(axes):]),
                              features, self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


def _matmul(x: jax.Array, kernel: jax.Array, n_in: int) -> jax.Array:
    """x [*lead, *in] @ kernel [*in, *out] -> [*lead, *out], as one 2-D [N, K] @ [K, M] matmul.

    The reshapes are free (row-major bitcasts), and the 2-D form keeps XLA's gradient matmuls free of layout
    copies: contracting a [B, L, K] activation over (B, L) for the kernel gradient made XLA transpose the
    activation or the gradient first (a copy of each per projection, 7 % of a 2-layer CPU step; benchmarks/README.md).
    """
    lead, k_in, out = x.shape[:x.ndim - n_in], kernel.shape[:n_in], kernel.shape[n_in:]
    y = jnp.dot(x.reshape(math.prod(lead), math.prod(k_in)), kernel.reshape(math.prod(k_in), math.prod(out)))
    return y.reshape(lead + out)


def dense(features: int | Sequence[int], names: Sequence[str], *, axis: int | Sequence[int] = -1,
          use_bias: bool = True, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
          kernel_init: Initializer = default_kernel_init, name: str | None = None,
          lora_rank: int = 0, lora_alpha: float = 1.0) -> Dense:
    """`Dense` with logical kernel axes `names` (input axes then output axes); `lora_rank` > 0 adds LoRA."""
    return Dense(features if isinstance(features, int) else tuple(features), tuple(names),
                 axis=axis if isinstance(axis, int) else tuple(axis), use_bias=use_bias, kernel_init=kernel_init,
                 dtype=dtype, param_dtype=param_dtype, name=name, lora_rank=lora_rank, lora_alpha=lora_alpha)


def layer_norm(*, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               name: str | None = None) -> nn.LayerNorm:
    """`nn.LayerNorm` over the last axis with `('embed',)` scale and bias."""
    return nn.LayerNorm(
        epsilon=1e-5, dtype=dtype, param_dtype=param_dtype,
        scale_init=partitioned(nn.initializers.ones_init(), ('embed',)),
        bias_init=partitioned(nn.initializers.zeros_init(), ('embed',)),
        name=name)


class Embed(nn.Module):
    """Token embedding: int [...] -> [..., features] from an ('vocab', 'embed') table initialised N(0, std).

    The table is gathered replicated along 'embed' (an all-gather, as FSDP does for every weight): gathering
    straight from an 'embed'-sharded table makes XLA's partitioner rematerialise the whole activation.
    """
    num_embeddings: int
    features: int
    std: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        """ids int [B,L] -> [B,L,features] in `dtype`."""
        table = self.param('embedding', partitioned(nn.initializers.normal(self.std), ('vocab', 'embed')),
                           (self.num_embeddings, self.features), self.param_dtype)
        table = constrain(table.astype(self.dtype), ('vocab', None))
        return constrain(jnp.take(table, ids, axis=0), ACT_TOKENS)


def constrain(x: jax.Array, names: Sequence[str]) -> jax.Array:
    """Logical sharding constraint (a no-op when no axis rules are active)."""
    return nn.with_logical_constraint(x, tuple(names))


def lora_kwargs(module: nn.Module, proj: str) -> dict[str, Any]:
    """`dense` LoRA kwargs for projection `proj` of `module` (fields lora_rank/alpha/targets): rank 0 unless
    '<module name>/<proj>' fullmatches `module.lora_targets`."""
    path = f'{module.name or type(module).__name__}/{proj}'
    on = module.lora_rank > 0 and re.fullmatch(module.lora_targets, path) is not None
    return dict(lora_rank=module.lora_rank if on else 0, lora_alpha=module.lora_alpha)


class Adapter(nn.Module):
    """Bottleneck adapter (Houlsby et al.): x + up(activation(down(x))), [..., E] -> [..., E].

    'down' [E, dim] ('embed', 'adapter') and 'up' [dim, E] ('adapter', 'embed'); 'up' (kernel and bias) is
    zero-initialised, so the adapter is exactly the identity at init.
    """
    dim: int
    activation: str = 'gelu'
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B,L,E] -> [B,L,E]."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = dense(self.dim, ('embed', 'adapter'), name='down', **kw)(x)
        h = activation_fn(self.activation)(h)
        return x + dense(x.shape[-1], ('adapter', 'embed'), kernel_init=nn.initializers.zeros_init(),
                         name='up', **kw)(h)


_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


@jax.custom_vjp
def gelu_exact(x: jax.Array) -> jax.Array:
    """Exact GELU, x * Phi(x) = x/2 * (1 + erf(x/sqrt 2)), as torch computes it; any shape, same shape out.

    Two choices make it ~3x cheaper per element than `jax.nn.gelu(approximate=False)` on CPU: `erf` rather
    than `erfc(-x/sqrt 2)` (XLA expands f32 erfc into exponentials and range selects, erf into one rational
    polynomial), and a custom gradient that keeps only x and computes Phi(x) + x phi(x) in the backward pass,
    instead of saving erf's output and running the product rule as separate passes over the [B, L, mlp_dim]
    activation. Equal to it within 1e-6 (tests/test_models.py); like torch's formula, 1 + erf cancels in the
    far negative tail, where GELU is below 1e-4.
    """
    return x * (0.5 + 0.5 * jax.lax.erf(x * jnp.asarray(_SQRT_HALF, x.dtype)))


def _gelu_fwd(x):
    return gelu_exact(x), x


def _gelu_bwd(x, g):
    # The barrier stops XLA from merging this erf with the forward's: merged, the forward split into an erf pass
    # whose [B, L, mlp_dim] output was kept alive for the backward to read, and a product pass. Recomputed, each
    # direction is one pass, and the 12-layer ViT-B/32 CLIP step's temporaries (f32, batch 32, no remat) fall
    # from 3.22 to 2.78 GB. (Its CPU step time did not change: those passes ran beside matmuls.)
    x = jax.lax.optimization_barrier(x)
    cdf = 0.5 + 0.5 * jax.lax.erf(x * jnp.asarray(_SQRT_HALF, x.dtype))
    pdf = jnp.asarray(_INV_SQRT_2PI, x.dtype) * jnp.exp(-0.5 * x * x)
    return (g * (cdf + x * pdf),)


gelu_exact.defvjp(_gelu_fwd, _gelu_bwd)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'gelu': gelu_exact,  # exact erf GELU (open_clip, torch default)
    'gelu_tanh': functools.partial(nn.gelu, approximate=True),  # tanh approximation (big_vision)
    'quick_gelu': lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP's original weights
}


def activation_fn(name: str) -> Callable[[jax.Array], jax.Array]:
    """The MLP nonlinearity called `name` (config `model.activation`): one of `ACTIVATIONS`."""
    if name not in ACTIVATIONS:
        raise ValueError(f'model.activation: {name!r} is not one of {sorted(ACTIVATIONS)}')
    return ACTIVATIONS[name]


class Mlp(nn.Module):
    """Two-layer MLP with the `activation` nonlinearity: [..., E] -> [..., mlp_dim] -> [..., E].

    LoRA fields as in `attention.MultiHeadAttention` (projections fc_in, fc_out; e.g. 'mlp/fc_in')."""
    mlp_dim: int
    activation: str = 'gelu'
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora_rank: int = 0
    lora_alpha: float = 1.0
    lora_targets: str = ''

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B,L,E] -> [B,L,E]."""
        width = x.shape[-1]
        h = dense(self.mlp_dim, ('embed', 'mlp'), dtype=self.dtype, param_dtype=self.param_dtype,
                  name='fc_in', **lora_kwargs(self, 'fc_in'))(x)
        h = constrain(activation_fn(self.activation)(h), ACT_MLP)
        return dense(width, ('mlp', 'embed'), dtype=self.dtype, param_dtype=self.param_dtype,
                     name='fc_out', **lora_kwargs(self, 'fc_out'))(h)


@jax.custom_vjp
def add_positions(x: jax.Array, pos: jax.Array) -> jax.Array:
    """x [B,L,E] + pos [L,E] (learned position embeddings, in x's dtype) -> [B,L,E].

    Same value and gradients as `x + pos[None]`; the gradient of `pos`, the sum of the incoming gradient over
    the batch, is computed as a [B] ones-vector contraction instead of a reduction. XLA:CPU's YNNPACK reduction
    over a short leading axis into a large output took 26-33 ms for ViT-B/32's [32,77,512] and [32,50,768]
    against 1.5-1.7 ms as a dot (71 ms of a 3-layer CLIP step's profile).
    """
    return x + pos[None]


def _add_positions_fwd(x, pos):
    return x + pos[None], None


def _add_positions_bwd(_, g):
    ones = jnp.ones((g.shape[0],), g.dtype)
    return g, jnp.einsum('b,ble->le', ones, g)


add_positions.defvjp(_add_positions_fwd, _add_positions_bwd)
