"""Memory-efficient contrastive losses: a device ring over the batch axes, c x c tiles within a device.

The plain losses in :mod:`mmjax.losses.contrastive` build the global ``[B, B]`` logits. The losses here never do, forward or
backward: peak memory grows with ``B * D``, not ``B**2``. They equal the plain ones (value, accuracies and gradients)
up to float32 rounding.

Layout. ``x``, ``y`` are global ``[B, D]`` arrays whose batch is split over the mesh axes ('data', 'fsdp'); the two
axes form ONE ring of ``n = data * fsdp`` devices, each holding ``b = B / n`` rows (device ``r`` holds global rows
``r*b .. r*b+b-1``, the order of ``PartitionSpec(('data', 'fsdp'))``). The 'tensor' axis is replicated: every
tensor slice runs the same ring. Inside :func:`jax.shard_map` each device keeps its ``x`` block and passes its ``y``
block around the ring with ``jax.lax.ppermute`` (n - 1 hops; the next block is sent before the current one is used,
so the transfer can overlap the compute). For each visiting block the device sweeps ``(b/c)**2`` tiles of
``c = chunk_size`` rows by ``c`` columns with two nested ``fori_loop``s, so only one ``[c, c]`` tile of logits is
live at a time. Per-column statistics travel with the ``y`` block and come home after the last hop.

Softmax (symmetric InfoNCE), ``s_ij = t * x_i . y_j``:
  forward: streaming log-sum-exp row-wise ``R_i = lse_j s_ij`` (kept by the row's device) and column-wise
  ``C_j = lse_i s_ij`` (travels with ``y_j``); loss ``= (sum_i (R_i - s_ii) + sum_j (C_j - s_jj)) / (2B)``.
  backward (custom VJP, residuals x, y, t, R, C): recomputes each tile,
  ``dL/ds_ij = (exp(s_ij - R_i) + exp(s_ij - C_j) - 2 [i == j]) / (2B)``, accumulates ``dx`` locally and ``dy``
  travelling with the ``y`` block.
Sigmoid (SigLIP), ``l_ij = t * x_i . y_j + bias``, ``z_ij = +1 if i == j else -1``:
  forward: ``-sum_ij log_sigmoid(z_ij l_ij) / B`` tile by tile; backward (custom VJP, residuals = inputs):
  ``dL/dl_ij = -z_ij sigmoid(-z_ij l_ij) / B``.
Retrieval accuracies (same definition as the plain losses: top-1 with ``argmax``, ties to the lowest index) are
tracked as a running (max, argmax) per row and per column.

Communication per loss+grad: forward ``n - 1`` hops of ``b * D`` floats (+ ``O(b)`` statistics), backward ``n - 1``
hops of ``b * D`` (y) and ``n`` hops of ``b * D`` (dy). Compute: the tiles are recomputed once in the backward pass
(3 matmuls of ``c x c x D`` per tile backward, 1 forward).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from mmjax.losses import contrastive as losses
from mmjax.runtime.sharding import BATCH_AXES

Metrics = dict[str, jax.Array]
ROWS = P(BATCH_AXES)           # [B] vectors split over the ring
ROWS_2D = P(BATCH_AXES, None)  # [B, D] embeddings split over the ring
SCALAR = P()


# ----------------------------------------------------------------------------------------------------------------
# Layout checks.

def ring_size(mesh: Mesh) -> int:
    """Number of devices in the batch ring: the product of the mesh's 'data' and 'fsdp' sizes."""
    missing = [a for a in BATCH_AXES if a not in mesh.shape]
    if missing:
        raise ValueError(f'Chunked contrastive losses need a mesh with axes {BATCH_AXES}; mesh axes are '
                         f'{tuple(mesh.shape)} (missing {missing}).')
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def _check_layout(batch: int, mesh: Mesh, chunk_size: int) -> None:
    """Raises ValueError unless B splits evenly over the ring and the per-device batch into chunks."""
    n = ring_size(mesh)
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f'chunk_size must be a positive int; got {chunk_size!r}.')
    if batch % n:
        raise ValueError(f'Global batch {batch} is not divisible by the batch ring size {n} '
                         f'(mesh data*fsdp = {dict((a, mesh.shape[a]) for a in BATCH_AXES)}).')
    per_device = batch // n
    if per_device % chunk_size:
        raise ValueError(f'Per-device batch {per_device} (global batch {batch} over {n} devices of the '
                         f"('data', 'fsdp') ring) is not divisible by chunk_size {chunk_size}.")


# ----------------------------------------------------------------------------------------------------------------
# Per-device building blocks (run inside shard_map, manual over all mesh axes).

def _varying(tree):
    """Marks freshly created (invariant) values as varying over the ring axes (scan/fori carries must keep one type)."""
    return jax.tree.map(lambda a: lax.pcast(a, BATCH_AXES, to='varying'), tree)


def _chunk(tree, start, size):
    return jax.tree.map(lambda a: lax.dynamic_slice_in_dim(a, start, size, axis=0), tree)


def _put_chunk(tree, update, start):
    return jax.tree.map(lambda a, u: lax.dynamic_update_slice_in_dim(a, u, start, axis=0), tree, update)


def _sweep(tile_fn: Callable, row_in, col_in, row_acc, col_acc, scalars, chunk: int):
    """Visits every c x c tile of a (local rows) x (visiting columns) block.

    row_in / row_acc: pytrees of arrays with leading dim b (read-only inputs / accumulators of the local rows).
    col_in / col_acc: the same for the visiting block's columns.
    scalars: pytree accumulated over all tiles.
    tile_fn(row_in_c, col_in_c, row_acc_c, col_acc_c, scalars) -> (row_acc_c, col_acc_c, scalars), where ``*_c``
    are the chunks (leading dim c) of one tile.
    Returns (row_acc, col_acc, scalars).
    """
    b = jax.tree.leaves(row_in)[0].shape[0]
    n_chunks = b // chunk

    def row_step(i, carry):
        row_acc, col_acc, scalars = carry
        r0 = i * chunk
        rin, racc = _chunk(row_in, r0, chunk), _chunk(row_acc, r0, chunk)

        def col_step(j, inner):
            racc, col_acc, scalars = inner
            c0 = j * chunk
            racc, cacc, scalars = tile_fn(rin, _chunk(col_in, c0, chunk), racc, _chunk(col_acc, c0, chunk),
                                          scalars)
            return racc, _put_chunk(col_acc, cacc, c0), scalars

        racc, col_acc, scalars = lax.fori_loop(0, n_chunks, col_step, (racc, col_acc, scalars))
        return _put_chunk(row_acc, racc, r0), col_acc, scalars

    return lax.fori_loop(0, n_chunks, row_step, (row_acc, col_acc, scalars))


def _ring(step_fn: Callable, vis_in, row_acc, vis_acc, scalars, n: int):
    """Runs ``step_fn`` once per ring position while the visiting blocks travel device r -> r+1.

    step_fn(k, vis_in, row_acc, vis_acc, scalars) -> (row_acc, vis_acc, scalars); at step k the visiting block
    belongs to ring position ``(me - k) mod n``. vis_in (read-only) hops n - 1 times; vis_acc hops n times, so it
    is back with its owner at the end. Returns (row_acc, vis_acc, scalars).
    """
    perm = [(r, (r + 1) % n) for r in range(n)]

    def shift(tree):
        return lax.ppermute(tree, BATCH_AXES, perm)

    def body(carry, k):
        vis_in, row_acc, vis_acc, scalars = carry
        next_in = shift(vis_in)  # independent of this step's compute: free to overlap with it
        row_acc, vis_acc, scalars = step_fn(k, vis_in, row_acc, vis_acc, scalars)
        return (next_in, row_acc, shift(vis_acc), scalars), None

    if n > 1:
        (vis_in, row_acc, vis_acc, scalars), _ = lax.scan(body, (vis_in, row_acc, vis_acc, scalars),
                                                          jnp.arange(n - 1))
    row_acc, vis_acc, scalars = step_fn(n - 1, vis_in, row_acc, vis_acc, scalars)
    if n > 1:
        vis_acc = shift(vis_acc)
    return row_acc, vis_acc, scalars


def _ids(position, b: int):
    """Global batch indices [b] of the block owned by ring position ``position``."""
    return position * b + jnp.arange(b, dtype=jnp.int32)


def _merge_best(best, ids, values, axis: int):
    """Running (max, argmax) update with a [c, c] tile; ties go to the lowest global index like ``argmax``.

    best: (max [c], argmax [c] int32); ids: global indices [c] along ``axis`` of ``values``.
    """
    top, arg = best
    tile_top = jnp.max(values, axis=axis)
    tile_arg = ids[jnp.argmax(values, axis=axis)]
    take = (tile_top > top) | ((tile_top == top) & (tile_arg < arg))
    return jnp.where(take, tile_top, top), jnp.where(take, tile_arg, arg)


def _fresh_best(b: int):
    return jnp.full((b,), -jnp.inf, jnp.float32), jnp.zeros((b,), jnp.int32)


def _accuracy(best, ids, batch: int):
    """Fraction of the global batch whose argmax is its own index (psum over the ring)."""
    return lax.psum(jnp.sum(best[1] == ids).astype(jnp.float32), BATCH_AXES) / batch


def _lse(values, axis: int):
    """Log-sum-exp of a [c, c] tile along ``axis``; the max is returned too (reused for accuracies)."""
    top = jnp.max(values, axis=axis)
    safe = jnp.where(jnp.isfinite(top), top, 0.0)
    return safe + jnp.log(jnp.sum(jnp.exp(values - jnp.expand_dims(safe, axis)), axis=axis))


def _dots(x_c, y_c):
    """[c, D] x [c, D] -> [c, c] float32 inner products."""
    return lax.dot_general(x_c, y_c, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _grad_tile(g, x_c, y_c, t):
    """Contributions of a tile with cotangent g = dL/dlogits [c, c] to dx [c, D], dy [c, D] (logits = t x y^T)."""
    dx = t * lax.dot_general(g, y_c, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    dy = t * lax.dot_general(g, x_c, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return dx, dy


# ----------------------------------------------------------------------------------------------------------------
# Softmax (symmetric InfoNCE).

def _softmax_forward_local(x, y, t, *, n: int, batch: int, chunk: int):
    """Per-device forward. x, y: [b, D]; t: scalar. Returns loss, i2t acc, t2i acc, R [b], C [b]."""
    b = x.shape[0]
    me = lax.axis_index(BATCH_AXES)
    row_ids = _ids(me, b)

    def tile(rin, cin, racc, cacc, scalars):
        (x_c, rid), (y_c, cid) = rin, cin
        s = t * _dots(x_c, y_c)
        r_lse, r_best = racc
        c_lse, c_best = cacc
        r_lse = jnp.logaddexp(r_lse, _lse(s, axis=1))
        c_lse = jnp.logaddexp(c_lse, _lse(s, axis=0))
        return (r_lse, _merge_best(r_best, cid, s, axis=1)), (c_lse, _merge_best(c_best, rid, s, axis=0)), scalars

    def step(k, vis_in, row_acc, vis_acc, scalars):
        col_ids = _ids((me - k) % n, b)
        return _sweep(tile, (x, row_ids), (vis_in, col_ids), row_acc, vis_acc, scalars, chunk)

    fresh = lambda: (jnp.full((b,), -jnp.inf, jnp.float32), _fresh_best(b))
    (row_lse, row_best), (col_lse, col_best), _ = _ring(step, y, _varying(fresh()), _varying(fresh()),
                                                        (), n)
    diag = t * jnp.sum(x * y, axis=1)
    local = jnp.sum(row_lse - diag) + jnp.sum(col_lse - diag)
    loss = lax.psum(local, BATCH_AXES) * (0.5 / batch)
    return (loss, _accuracy(row_best, row_ids, batch), _accuracy(col_best, row_ids, batch), row_lse, col_lse)


def _softmax_backward_local(x, y, t, row_lse, col_lse, g, *, n: int, batch: int, chunk: int):
    """Per-device backward. Returns dx [b, D], dy [b, D], dt scalar (summed over the ring)."""
    coef = g * (0.5 / batch)

    def tile(rin, cin, racc, cacc, dt):
        (x_c, r_c), (y_c, c_c) = rin, cin
        dots = _dots(x_c, y_c)
        s = t * dots
        grad = coef * (jnp.exp(s - r_c[:, None]) + jnp.exp(s - c_c[None, :]))
        dx, dy = _grad_tile(grad, x_c, y_c, t)
        return racc + dx, cacc + dy, dt + jnp.sum(grad * dots)

    def step(k, vis_in, dx, dy, dt):
        return _sweep(tile, (x, row_lse), vis_in, dx, dy, dt, chunk)

    dx, dy, dt = _ring(step, (y, col_lse), _varying(jnp.zeros(x.shape, x.dtype)), _varying(jnp.zeros(y.shape, y.dtype)),
                       _varying(jnp.zeros((), jnp.float32)), n)
    # The label term -[i == j] / B of dL/ds, local to each device.
    dx = dx - 2.0 * coef * t * y
    dy = dy - 2.0 * coef * t * x
    dt = dt - 2.0 * coef * jnp.sum(x * y)
    return dx, dy, lax.psum(dt, BATCH_AXES)


@functools.cache
def _softmax_fn(mesh: Mesh, chunk: int, batch: int):
    """custom_vjp (x [B,D] f32, y [B,D] f32, t f32) -> (loss, (acc_xy, acc_yx)) for one mesh/chunk/batch."""
    n = ring_size(mesh)
    fwd_map = jax.shard_map(
        functools.partial(_softmax_forward_local, n=n, batch=batch, chunk=chunk), mesh=mesh,
        in_specs=(ROWS_2D, ROWS_2D, SCALAR), out_specs=(SCALAR, SCALAR, SCALAR, ROWS, ROWS))
    bwd_map = jax.shard_map(
        functools.partial(_softmax_backward_local, n=n, batch=batch, chunk=chunk), mesh=mesh,
        in_specs=(ROWS_2D, ROWS_2D, SCALAR, ROWS, ROWS, SCALAR), out_specs=(ROWS_2D, ROWS_2D, SCALAR))

    @jax.custom_vjp
    def loss_fn(x, y, t):
        loss, acc_xy, acc_yx, _, _ = fwd_map(x, y, t)
        return loss, (acc_xy, acc_yx)

    def fwd(x, y, t):
        loss, acc_xy, acc_yx, row_lse, col_lse = fwd_map(x, y, t)
        return (loss, (acc_xy, acc_yx)), (x, y, t, row_lse, col_lse)

    def bwd(res, cotangents):
        g, _ = cotangents  # accuracies are piecewise constant: their cotangents contribute nothing
        return bwd_map(*res, g)

    loss_fn.defvjp(fwd, bwd)
    return loss_fn


def chunked_softmax_contrastive_loss(x: jax.Array, y: jax.Array, logit_scale: jax.Array, *, mesh: Mesh,
                                     chunk_size: int,
                                     names: tuple[str, str] = ('i', 't')) -> tuple[jax.Array, Metrics]:
    """Symmetric InfoNCE equal to :func:`mmjax.losses.contrastive.softmax_contrastive_loss`, without the [B, B] logits.

    Args:
        x: [B, D] global embeddings of the first modality, batch split over ('data', 'fsdp') (any sharding works;
            shard_map reshards to that one).
        y: [B, D] embeddings of the second modality; ``y[i]`` matches ``x[i]``.
        logit_scale: scalar multiplier (already exponentiated).
        mesh: the mesh with axes 'data', 'fsdp' (the ring) and optionally 'tensor' (replicated).
        chunk_size: tile side c; the per-device batch B / (data * fsdp) must be divisible by it. Peak temporary
            memory per device is about ``O(b * D + c * c)``.
        names: short names of the two modalities, used in metric keys.

    Returns:
        loss: scalar float32; metrics: {'loss', '<a>2<b>_acc', '<b>2<a>_acc', 'logit_scale'}.
    """
    x, y, t = losses.check_pair(x, y, logit_scale)
    _check_layout(x.shape[0], mesh, chunk_size)
    loss, (acc_xy, acc_yx) = _softmax_fn(mesh, chunk_size, x.shape[0])(x, y, t)
    a, b = names
    return loss, {'loss': loss, f'{a}2{b}_acc': acc_xy, f'{b}2{a}_acc': acc_yx, 'logit_scale': t}


# ----------------------------------------------------------------------------------------------------------------
# Sigmoid (SigLIP).

def _sigmoid_forward_local(x, y, t, bias, *, n: int, batch: int, chunk: int):
    """Per-device forward. Returns loss, x->y acc, y->x acc (all scalars, summed over the ring)."""
    b = x.shape[0]
    me = lax.axis_index(BATCH_AXES)
    row_ids = _ids(me, b)

    def tile(rin, cin, r_best, c_best, total):
        (x_c, rid), (y_c, cid) = rin, cin
        logits = t * _dots(x_c, y_c) + bias
        signs = jnp.where(rid[:, None] == cid[None, :], 1.0, -1.0)
        total = total - jnp.sum(jax.nn.log_sigmoid(signs * logits))
        return _merge_best(r_best, cid, logits, axis=1), _merge_best(c_best, rid, logits, axis=0), total

    def step(k, vis_in, row_acc, vis_acc, total):
        col_ids = _ids((me - k) % n, b)
        return _sweep(tile, (x, row_ids), (vis_in, col_ids), row_acc, vis_acc, total, chunk)

    row_best, col_best, total = _ring(step, y, _varying(_fresh_best(b)), _varying(_fresh_best(b)),
                                      _varying(jnp.zeros((), jnp.float32)), n)
    loss = lax.psum(total, BATCH_AXES) / batch
    return loss, _accuracy(row_best, row_ids, batch), _accuracy(col_best, row_ids, batch)


def _sigmoid_backward_local(x, y, t, bias, g, *, n: int, batch: int, chunk: int):
    """Per-device backward. Returns dx [b, D], dy [b, D], dt, dbias (scalars summed over the ring)."""
    b = x.shape[0]
    me = lax.axis_index(BATCH_AXES)
    row_ids = _ids(me, b)
    coef = g / batch

    def tile(rin, cin, racc, cacc, scalars):
        (x_c, rid), (y_c, cid) = rin, cin
        dots = _dots(x_c, y_c)
        signs = jnp.where(rid[:, None] == cid[None, :], 1.0, -1.0)
        grad = -coef * signs * jax.nn.sigmoid(-signs * (t * dots + bias))
        dx, dy = _grad_tile(grad, x_c, y_c, t)
        dt, dbias = scalars
        return racc + dx, cacc + dy, (dt + jnp.sum(grad * dots), dbias + jnp.sum(grad))

    def step(k, vis_in, dx, dy, scalars):
        col_ids = _ids((me - k) % n, b)
        return _sweep(tile, (x, row_ids), (vis_in, col_ids), dx, dy, scalars, chunk)

    zero = jnp.zeros((), jnp.float32)
    dx, dy, (dt, dbias) = _ring(step, y, _varying(jnp.zeros(x.shape, x.dtype)), _varying(jnp.zeros(y.shape, y.dtype)),
                                _varying((zero, zero)), n)
    return dx, dy, lax.psum(dt, BATCH_AXES), lax.psum(dbias, BATCH_AXES)


@functools.cache
def _sigmoid_fn(mesh: Mesh, chunk: int, batch: int):
    """custom_vjp (x, y, t, bias) -> (loss, (acc_xy, acc_yx)) for one mesh/chunk/batch."""
    n = ring_size(mesh)
    fwd_map = jax.shard_map(
        functools.partial(_sigmoid_forward_local, n=n, batch=batch, chunk=chunk), mesh=mesh,
        in_specs=(ROWS_2D, ROWS_2D, SCALAR, SCALAR), out_specs=(SCALAR, SCALAR, SCALAR))
    bwd_map = jax.shard_map(
        functools.partial(_sigmoid_backward_local, n=n, batch=batch, chunk=chunk), mesh=mesh,
        in_specs=(ROWS_2D, ROWS_2D, SCALAR, SCALAR, SCALAR), out_specs=(ROWS_2D, ROWS_2D, SCALAR, SCALAR))

    @jax.custom_vjp
    def loss_fn(x, y, t, bias):
        loss, acc_xy, acc_yx = fwd_map(x, y, t, bias)
        return loss, (acc_xy, acc_yx)

    def fwd(x, y, t, bias):
        return loss_fn(x, y, t, bias), (x, y, t, bias)

    def bwd(res, cotangents):
        g, _ = cotangents
        return bwd_map(*res, g)

    loss_fn.defvjp(fwd, bwd)
    return loss_fn


def chunked_sigmoid_contrastive_loss(x: jax.Array, y: jax.Array, logit_scale: jax.Array,
                                     logit_bias: jax.Array | None = None, *, mesh: Mesh, chunk_size: int,
                                     names: tuple[str, str] = ('i', 't')) -> tuple[jax.Array, Metrics]:
    """SigLIP loss equal to :func:`mmjax.losses.contrastive.sigmoid_contrastive_loss`, without the [B, B] logits.

    Args:
        x, y: [B, D] global embeddings (row i of each is a matching pair), batch split over ('data', 'fsdp').
        logit_scale: scalar multiplier; logit_bias: scalar added to every logit (None means 0).
        mesh, chunk_size: as in :func:`chunked_softmax_contrastive_loss`.
        names: short names of the two modalities, used in metric keys.

    Returns:
        loss: scalar float32 ``-sum_ij log_sigmoid(z_ij logits_ij) / B``;
        metrics: {'loss', '<a>2<b>_acc', '<b>2<a>_acc', 'logit_scale', 'logit_bias'}.
    """
    x, y, t = losses.check_pair(x, y, logit_scale)
    if logit_bias is None:
        logit_bias = 0.0
    if jnp.ndim(logit_bias) != 0:
        raise ValueError(f'logit_bias must be a scalar; got shape {jnp.shape(logit_bias)}.')
    bias = jnp.asarray(logit_bias, jnp.float32)
    _check_layout(x.shape[0], mesh, chunk_size)
    loss, (acc_xy, acc_yx) = _sigmoid_fn(mesh, chunk_size, x.shape[0])(x, y, t, bias)
    a, b = names
    return loss, {'loss': loss, f'{a}2{b}_acc': acc_xy, f'{b}2{a}_acc': acc_yx, 'logit_scale': t,
                  'logit_bias': bias}


# ----------------------------------------------------------------------------------------------------------------
# Dispatch on model outputs (mirrors losses.pairwise_contrastive_loss / losses.contrastive_loss).

def pairwise_contrastive_loss_chunked(outputs: dict, a: str, b: str, loss_name: str, mesh: Mesh,
                                      chunk_size: int) -> tuple[jax.Array, Metrics]:
    """Chunked contrastive loss between modalities ``a`` and ``b`` of a model output dict.

    Args:
        outputs: {'embeddings': {modality: [B, D]}, 'logit_scale': scalar, optional 'logit_bias': scalar}.
        a, b: modality names, keys of ``outputs['embeddings']``.
        loss_name: 'softmax' or 'sigmoid'.
        mesh, chunk_size: as in :func:`chunked_softmax_contrastive_loss`.
    """
    if loss_name not in losses.LOSS_NAMES:
        raise ValueError(f'Unknown contrastive loss {loss_name!r}; expected one of {list(losses.LOSS_NAMES)}.')
    embeddings = outputs['embeddings']
    for name in (a, b):
        if name not in embeddings:
            raise ValueError(f'Model outputs have no {name!r} embeddings; available: {sorted(embeddings)}.')
    names = (a[0], b[0])
    if loss_name == 'sigmoid':
        return chunked_sigmoid_contrastive_loss(embeddings[a], embeddings[b], outputs['logit_scale'],
                                                outputs.get('logit_bias'), mesh=mesh, chunk_size=chunk_size,
                                                names=names)
    return chunked_softmax_contrastive_loss(embeddings[a], embeddings[b], outputs['logit_scale'], mesh=mesh,
                                            chunk_size=chunk_size, names=names)


def contrastive_loss_chunked(outputs: dict, loss_name: str, mesh: Mesh,
                             chunk_size: int) -> tuple[jax.Array, Metrics]:
    """Image-text loss of a ``ContrastiveModel`` output dict; drop-in for ``losses.contrastive_loss``.

    Args:
        outputs: {'embeddings': {'image': [B, D], 'text': [B, D]}, 'logit_scale': scalar, optional 'logit_bias'}.
        loss_name: 'softmax' (CLIP InfoNCE) or 'sigmoid' (SigLIP; uses ``logit_bias`` when present).
        mesh: the training mesh; chunk_size: tile side (divides the per-device batch).

    Returns:
        (loss scalar float32, metrics dict with 'loss', 'i2t_acc', 't2i_acc', ...).
    """
    return pairwise_contrastive_loss_chunked(outputs, 'image', 'text', loss_name, mesh, chunk_size)
