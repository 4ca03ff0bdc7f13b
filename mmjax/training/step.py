"""The pure train step, and the one jitted version of it that training, `mmjax compile` and `mmjax bench` share.

    (state, global batch) -> objective (the task's) -> value_and_grad -> optax update -> (new state, metrics)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mmjax.losses.gradcache import stop_frozen_gradients
from mmjax.runtime import sharding as shd
from mmjax.tasks import get_task
from mmjax.training.state import StateFactory, TrainState

# Block on a step's result at least this often: bounds the work queued ahead of the host (and the
# collectives in flight, which deadlock multi-process CPU runs past ~30).
MAX_STEPS_IN_FLIGHT = 8


def step_inputs(config) -> tuple[str, ...]:
    """The batch keys `config`'s train step reads (its task's `inputs`). Batches keep only these (the loader
    may carry more)."""
    return get_task(config).inputs(config)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, schedule, objective,
                    trainable: Any = None):
    """A pure step: (state, global batch) -> (new state, metrics dict of scalars).

    objective: (model, params, batch, step) -> (loss, metrics), the task's (`Task.objective`). Metrics always hold
    'loss', 'grad_norm', 'lr', 'skipped' plus the task's own ('logit_scale' only when the model has one).
    trainable: `StateFactory.trainable`, a tree of bools like the params matching the freeze rules `tx` was built
    with. Frozen parameters then enter the loss under `stop_gradient`: the backward work only they need is not
    done (a locked tower's whole backward, every frozen kernel's weight gradient), 'grad_norm' is the norm of
    the trainable gradients, and `tx` clips by that norm instead of computing it again. None (every parameter
    trainable as far as the step knows): gradients of all parameters are computed and `tx` computes its own
    clipping norm.
    """

    value_and_grad = getattr(objective, "value_and_grad", None)
    tx = optax.with_extra_args_support(tx)
    norm_args = (lambda norm: {}) if trainable is None else (lambda norm: {"grad_norm": norm})

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        def loss_fn(params):
            return objective(model, stop_frozen_gradients(params, trainable), batch, state.step)

        if value_and_grad is not None:  # e.g. GradCacheObjective: accumulated over micro-batches
            (loss, metrics), grads = value_and_grad(model, state.params, batch, state.step, trainable=trainable)
        else:
            (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grad_norm = optax.global_norm(grads)  # frozen parameters' gradients are zeros here
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(params, opt_state, grads):
            updates, opt_state = tx.update(grads, opt_state, params, **norm_args(grad_norm))
            return optax.apply_updates(params, updates), opt_state

        # A non-finite loss or gradient skips the update: params and optimizer state stay as they were. A
        # conditional rather than an elementwise select of new and old: the select kept both copies of params
        # and optimizer state alive (0.75 s against 0.44 s for ViT-B/32's update on the CPU).
        params, opt_state = jax.lax.cond(finite, update, lambda params, opt_state, grads: (params, opt_state),
                                         state.params, state.opt_state, grads)
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm, lr=schedule(state.step),
                       skipped=(~finite).astype(jnp.int32))
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def jit_train_step(config, factory: StateFactory, mesh):
    """`config`'s train step jitted as every run uses it (`train`, `mmjax compile`, `mmjax bench`): (state,
    global batch) -> (new state, metrics); the state sharded as `factory.shardings`, the batch over the batch
    axes, the metrics replicated, and the input state donated (its buffers become the new state's)."""
    return jax.jit(
        make_train_step(factory.model, factory.tx, factory.schedule, objective=factory.task.objective(config, mesh),
                        trainable=factory.trainable),
        in_shardings=(factory.shardings, shd.batch_sharding(mesh)),
        out_shardings=(factory.shardings, shd.replicated(mesh)),
        donate_argnums=0,
    )
