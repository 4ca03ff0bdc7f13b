"""Gradient accumulation over micro-batches that equals the large-batch step (GradCache).

A contrastive loss couples every example of the batch (each row is scored against all columns), so averaging
per-micro-batch losses is a different objective. Instead, with ``k`` micro-batches of ``B/k`` rows, inside one
jitted step:

  1. embed: ``lax.scan`` over the micro-batches runs the forward pass only (no activations are kept) and
     collects the embeddings ``[k, B/k, D]`` of every modality, plus the batch-independent outputs
     (``logit_scale``, ``logit_bias``);
  2. loss: the full-batch contrastive loss on the re-assembled ``[B, D]`` embeddings (exactly what the large-batch
     step sees), and its gradient w.r.t. the model outputs: embeddings and the scale/bias scalars;
  3. pull back: ``lax.scan`` over the micro-batches again recomputes each micro-batch's forward under ``jax.vjp``
     w.r.t. the params and pulls back its ``[B/k, D]`` slice of the embedding cotangents (micro-batch 0 also carries
     the scale/bias cotangents, so they are counted once); the parameter gradients are summed.

Peak activation memory is that of one micro-batch; the cost is one extra forward pass (phase 1).

Layout. Batch arrays ``[B, ...]`` are split over the mesh axes of the logical axis ``act_batch`` (('data', 'fsdp')),
each of ``n`` devices holding ``b = B/n`` consecutive rows. Micro-batch ``j`` is rows ``{r : r % k == j}``:
``x.reshape(B/k, k, ...)`` keeps each device's rows on it (its ``b`` rows are ``b/k`` whole groups of ``k``), and
the transpose to ``[k, B/k, ...]`` is local too. So every micro-batch is still split over all ``n`` devices
(``b/k`` rows each) and no data moves; the embeddings go back to the original row order by the inverse (local)
reshape. Requires ``k | b``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


def stop_frozen_gradients(params: Any, trainable: Any) -> Any:
    """``params`` with every leaf whose ``trainable`` entry is False under ``lax.stop_gradient``.

    Apply it inside the differentiated function: autodiff then treats frozen parameters as constants, so their
    gradients are zeros and the backward work only they need (their weight-gradient matmuls; a frozen tower's
    whole backward) is never done. ``trainable``: a tree of bools like ``params``
    (``mmjax.training.finetune.trainable_mask``), or None for all trainable (``params`` returned as they are).
    """
    if trainable is None:
        return params
    return jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, trainable)


EMBEDDINGS = "embeddings"
BATCH = "act_batch"


def batch_shards() -> int:
    """Devices the batch is split over: the mesh sizes of the axes ``act_batch`` maps to (1 outside a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not nn.get_logical_axis_rules():
        return 1
    axes = nn.logical_to_mesh_axes((BATCH,))[0]
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(mesh.shape[a] for a in axes if a in mesh.shape)


def check_micro_batches(batch_size: int, num_micro_batches: int, shards: int = 1) -> None:
    """Raises ValueError unless ``num_micro_batches`` divides ``batch_size`` and the per-device batch."""
    k = num_micro_batches
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"num_micro_batches must be a positive int; got {k!r}.")
    if batch_size % k:
        raise ValueError(f"num_micro_batches={k} does not divide the batch of {batch_size} examples.")
    if batch_size % shards or (batch_size // shards) % k:
        raise ValueError(f"num_micro_batches={k} does not divide the per-device batch "
                         f"{batch_size / shards:g} (batch {batch_size} over {shards} devices of the batch "
                         f"axes); each micro-batch must keep every device's rows local.")


def _constrain(x: jax.Array, batch_dim: int) -> jax.Array:
    """Sharding hint: dim ``batch_dim`` of ``x`` over the batch axes, the rest unconstrained (replicated)."""
    names = [None] * x.ndim
    names[batch_dim] = BATCH
    return nn.with_logical_constraint(x, tuple(names))


def split_micro_batches(x: jax.Array, k: int) -> jax.Array:
    """[B, ...] -> [k, B/k, ...]; micro-batch j = rows r with r % k == j, still split over the batch axes."""
    x = _constrain(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0)
    return _constrain(jnp.swapaxes(x, 0, 1), 1)


def merge_micro_batches(x: jax.Array) -> jax.Array:
    """Inverse of :func:`split_micro_batches`: [k, B/k, ...] -> [B, ...] in the original row order."""
    k, m = x.shape[:2]
    x = _constrain(jnp.swapaxes(_constrain(x, 1), 0, 1), 0)
    return _constrain(x.reshape(k * m, *x.shape[2:]), 0)


def accumulated_value_and_grad(model: nn.Module, params: Any, batch: dict[str, jax.Array],
                               contrastive_loss: Callable[[dict], tuple[jax.Array, Any]],
                               num_micro_batches: int, trainable: Any = None) -> tuple[tuple[jax.Array, Any], Any]:
    """Loss and parameter gradients of the full batch, computed micro-batch by micro-batch.

    Args:
      model: a module whose ``apply({'params': params}, batch, train=True)`` returns
        ``{'embeddings': {name: [B, D]}, ...}``: rows of every ``embeddings`` leaf follow the batch rows; every
        other leaf (``logit_scale``, ``logit_bias``) must not depend on the batch.
      params: the model parameters (pytree).
      batch: {key: [B, ...]} model inputs, batch-leading (every leaf is split into micro-batches).
      contrastive_loss: model outputs dict -> (loss scalar, aux pytree), e.g.
        ``lambda o: mmjax.losses.contrastive.contrastive_loss(o, 'softmax')``; it always sees the full-batch outputs.
      num_micro_batches: k; must divide B and the per-device batch B / (data*fsdp). 1 is plain
        ``jax.value_and_grad``.
      trainable: tree of bools like params, or None (all trainable); frozen parameters are constants to
        autodiff (``mmjax.training.optim.stop_frozen_gradients``): zero gradients, and no backward work only they need.

    Returns:
      ((loss, aux), grads), equal to ``jax.value_and_grad(lambda p: contrastive_loss(model.apply(p, batch)),
      has_aux=True)(params)`` up to float32 rounding; grads has the structure of params.

    Raises:
      ValueError if k does not divide the batch or the per-device batch.
    """
    def forward(p, inputs):
        return model.apply({"params": stop_frozen_gradients(p, trainable)}, inputs, train=True)

    k = num_micro_batches
    sizes = {x.shape[0] for x in jax.tree.leaves(batch)}
    if len(sizes) != 1:
        raise ValueError(f"batch leaves must share one leading (batch) size; got {sorted(sizes)}.")
    check_micro_batches(sizes.pop(), k, batch_shards())
    if k == 1:
        return jax.value_and_grad(lambda p: contrastive_loss(forward(p, batch)), has_aux=True)(params)

    micro = jax.tree.map(lambda x: split_micro_batches(x, k), batch)

    # 1. Embed every micro-batch, forward only.
    def embed(_, inputs):
        return None, forward(params, inputs)

    _, stacked = lax.scan(embed, None, micro)  # every output leaf gets a leading [k]
    outputs = {name: (jax.tree.map(merge_micro_batches, value) if name == EMBEDDINGS
                      else jax.tree.map(lambda x: x[0], value))
               for name, value in stacked.items()}

    # 2. The full-batch loss and its gradient w.r.t. the model outputs.
    (loss, aux), d_outputs = jax.value_and_grad(contrastive_loss, has_aux=True)(outputs)
    d_embeddings = jax.tree.map(lambda g: split_micro_batches(g, k), d_outputs[EMBEDDINGS])
    d_shared = {name: value for name, value in d_outputs.items() if name != EMBEDDINGS}

    # 3. Recompute each micro-batch under vjp and pull back its slice of the cotangents.
    def pull_back(grads, xs):
        inputs, d_emb, index = xs
        out, vjp = jax.vjp(lambda p: forward(p, inputs), params)
        first = index == 0  # batch-independent outputs: their cotangent is pulled back once
        cotangent = {name: (d_emb if name == EMBEDDINGS else
                            jax.tree.map(lambda g, o: jnp.where(first, g, jnp.zeros_like(g)).astype(o.dtype),
                                         d_shared[name], value))
                     for name, value in out.items()}
        (g,) = vjp(cotangent)
        return jax.tree.map(jnp.add, grads, g), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, _ = lax.scan(pull_back, zeros, (micro, d_embeddings, jnp.arange(k)))
    return (loss, aux), grads
