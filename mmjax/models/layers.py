"""Transformer building blocks with logical partitioning on every parameter.

Every parameter is created through `nn.with_logical_partitioning` with names from the project vocabulary
(`embed`, `mlp`, `heads`, `kv`, `vocab`, `patch`, `length`, `joint`, `layers`); activations are constrained with
`act_*` names. Compute runs in `dtype`, parameters are stored in `param_dtype`.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any, Callable, Sequence

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


def einsum_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, scale: float,
                     dtype: Dtype) -> jax.Array:
    """Softmax attention spelled out: q [B,Lq,H,D], k and v [B,Lk,H,D], bool mask broadcastable to
    [B,H,Lq,Lk] (True = may attend) -> [B,Lq,H,D]. Logits and softmax in float32, products in `dtype`.

    The heads move next to the batch axis first ([B,H,L,D]), so both products are batched matmuls over (B, H)
    contracting each operand's last axis. Contracting the [B,L,H,D] layouts directly, XLA:CPU made two more
    transposed copies per layer; this form runs an attention layer's forward (projections included) 7-18 %
    faster at ViT-B/32's text [32,77,8,64] and image [32,50,12,64] shapes (forward + backward: between 7 %
    faster and 1 % slower).
    """
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q * jnp.asarray(scale, q.dtype), k, v))
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
    def __call__(self, x_q: jax.Array, x_kv: jax.Array | None = None,
                 mask: jax.Array | None = None) -> jax.Array:
        """Attend from `x_q` [B,Lq,E] to `x_kv` [B,Lk,Ekv] (`x_q` itself when None).

        `mask` is bool, broadcastable to [B,H,Lq,Lk] (shape [B,1|H,Lq|1,Lk]); True = may attend.
        Returns [B,Lq,out_features].
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
        k = constrain(proj(name='key', **lora_kwargs(self, 'key'))(x_kv), ACT_HEADS)
        v = constrain(proj(name='value', **lora_kwargs(self, 'value'))(x_kv), ACT_HEADS)

        if self._use_dot_product_attention():
            if mask is not None:
                mask = jnp.broadcast_to(mask, (q.shape[0], mask.shape[1], q.shape[1], k.shape[1]))
            out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=head_dim ** -0.5)
        else:
            out = einsum_attention(q, k, v, mask, head_dim ** -0.5, self.dtype)
        out = constrain(out, ACT_HEADS)
        return dense(out_features, ('heads', 'kv', 'embed'), axis=(-2, -1), dtype=self.dtype,
                     param_dtype=self.param_dtype, name='out', **lora_kwargs(self, 'out'))(out)


    def _use_dot_product_attention(self) -> bool:
        if self.implementation not in ('auto', 'einsum', 'dot_product'):
            raise ValueError(f"attention implementation must be 'auto', 'einsum' or 'dot_product'; "
                             f"got {self.implementation!r}")
        if self.implementation == 'auto':
            return jax.default_backend() == 'gpu' and jnp.dtype(self.dtype).itemsize == 2
        return self.implementation == 'dot_product'


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

    LoRA fields as in `MultiHeadAttention` (projections fc_in, fc_out; e.g. 'mlp/fc_in')."""
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
    residual add); `lora_*` add LoRA to the attention/MLP projections matching `lora_targets` (see `Dense`).
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
        block_cls = EncoderBlock
        if self.remat != 'none':
            if self.remat not in REMAT_POLICIES:
                raise ValueError(f"model.remat must be one of 'none', {sorted(REMAT_POLICIES)}; "
                                 f'got {self.remat!r}')
            block_cls = nn.remat(block_cls, policy=REMAT_POLICIES[self.remat], prevent_cse=not self.scan)
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


def pooled_token_features(encoder: 'Encoder', x: jax.Array, mask: jax.Array | None, index: jax.Array,
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
