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
from mmjax.training.optim import StateBound, measure_bound
from mmjax.training.state import StateFactory, TrainState, unknown_bound

# Block on a step's result at least this often: bounds the work queued ahead of the host (and the
# collectives in flight, which deadlock multi-process CPU runs past ~30).
MAX_STEPS_IN_FLIGHT = 8


def step_inputs(config) -> tuple[str, ...]:
    """The batch keys `config`'s train step reads (its task's `inputs`). Batches keep only these (the loader
    may carry more)."""
    return get_task(config).inputs(config)


def all_finite(tree: Any) -> jax.Array:
    """Whether every floating-point value in `tree` is finite (a bool scalar), as one fused reduction per leaf
    shape: `x * 0` is 0 for a finite x and NaN for an inf or a NaN, and the leaves of one shape are added up
    elementwise before they are summed, so a parameter's new value and its optimizer moments (computed from
    the same inputs) are checked in one pass over those inputs. Exact: no overflow of a sum of large finite
    values, and no inf or NaN missed."""
    by_shape: dict[tuple[int, ...], jax.Array] = {}
    for x in jax.tree.leaves(tree):
        if jnp.issubdtype(x.dtype, jnp.floating):
            zero = x.astype(jnp.float32) * 0
            by_shape[x.shape] = by_shape[x.shape] + zero if x.shape in by_shape else zero
    return jnp.isfinite(sum((jnp.sum(z) for z in by_shape.values()), jnp.float32(0)))


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, schedule, objective,
                    trainable: Any = None, bound_rule: StateBound | None = None):
    """A pure step: (state, global batch) -> (new state, metrics dict of scalars).

    objective: (model, params, batch, step) -> (loss, metrics), the task's (`Task.objective`). Metrics always hold
    'loss', 'grad_norm', 'lr', 'skipped' plus the task's own ('logit_scale' only when the model has one); 'skipped'
    is 1 when the update was not applied (a non-finite loss, gradient norm, or new parameters or optimizer state),
    and the state is then returned unchanged but for its step.
    trainable: `StateFactory.trainable`, a tree of bools like the params matching the freeze rules `tx` was built
    with. Frozen parameters then enter the loss under `stop_gradient`: the backward work only they need is not
    done (a locked tower's whole backward, every frozen kernel's weight gradient), 'grad_norm' is the norm of
    the trainable gradients, and `tx` clips by that norm instead of computing it again. None (every parameter
    trainable as far as the step knows): gradients of all parameters are computed and `tx` computes its own
    clipping norm.
    bound_rule: `StateFactory.bound_rule`, the `StateBound` of `tx` (the step then carries `TrainState.bound` and
    checks most updates without reading the state; see below). None: every update is checked exactly.
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

        def update(params, opt_state, grads):
            updates, opt_state = tx.update(grads, opt_state, params, **norm_args(grad_norm))
            return optax.apply_updates(params, updates), opt_state

        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        params, opt_state, bound, finite = guarded_update(state, grads, grad_norm, finite, update, bound_rule)
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm, lr=schedule(state.step),
                       skipped=(~finite).astype(jnp.int32))
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, bound=bound), metrics

    return train_step


def guarded_update(state: TrainState, grads: Any, grad_norm: jax.Array, finite: jax.Array, update,
                   bound_rule: StateBound | None):
    """`update(params, opt_state, grads) -> (params, opt_state)` applied to `state` only when `finite` (the loss
    and gradient norm are) AND the state it would produce is finite; otherwise params and optimizer state stay as
    they were, bit for bit. Returns (params, opt_state, the new `TrainState.bound`, whether it was applied).

    Proven finite (`bound_rule`, AdamW): the state carries bounds of its values (`TrainState.bound`); from them and
    the gradient norm, a few scalar operations bound every intermediate and the new state (`StateBound.advance`).
    When all stay far below float32's largest value the update cannot produce inf or NaN: it is applied
    unchecked, and the new bounds go with the new state. Nothing reads the state for this: its cost is that of a
    dozen scalars.

    Checked exactly (no bound, an unknown one, one that no longer proves it, or no `bound_rule`): a dry run of the
    update fused into `all_finite`'s reductions, then a conditional that computes the update again, in place over
    the donated state. Checking the computed update instead keeps old and new state alive together and copies one
    of them into the output (measured on ViT-B/32's update on the CPU: 2.2 GB more temporaries, 4-6x the update's
    time); the dry run adds no temporaries and costs about one more update (docs/reliability.md, "Non-finite
    state"). Conditionals rather than elementwise selects for the same reason (0.75 s against 0.44 s). A state
    updated this way is then measured (one more read) for its bound.

    Both leave the rest of the step compiled as before: a finite step is bit-identical to one without the check.
    """
    def keep(params, opt_state, grads):
        return params, opt_state

    def checked_update(params, opt_state, grads):
        ok = all_finite(update(params, opt_state, grads))  # a dry run: reads the state, writes nothing
        return jax.lax.cond(ok, update, keep, params, opt_state, grads) + (ok,)

    if bound_rule is None or not state.bound_covers_state():
        params, opt_state, finite = jax.lax.cond(finite, checked_update, lambda *a: keep(*a) + (jnp.bool_(False),),
                                                 state.params, state.opt_state, grads)
        return params, opt_state, state.bound, finite
    proven, next_bound = bound_rule.advance(state.bound, grad_norm)
    fast, slow = finite & proven, finite & ~proven
    # Three conditionals in a row, each over the state in place. Nesting the proven update and the exact check in
    # one conditional (or a three-way switch), or measuring inside the check's, made XLA copy the whole state
    # (measured on ViT-B/32: +0.6 CPU-s a step, more than the dry run it replaces).
    params, opt_state = jax.lax.cond(fast, update, keep, state.params, state.opt_state, grads)
    params, opt_state, checked = jax.lax.cond(slow, checked_update, lambda *a: keep(*a) + (jnp.bool_(False),),
                                              params, opt_state, grads)
    # The checked and updated state is measured; one that was skipped stays unknown (it may hold NaN or a negative
    # nu); a state skipped for its loss or gradient keeps its bound.
    bound = jax.lax.cond(slow & checked, measure_bound,
                         lambda *a: jnp.where(fast, next_bound, jnp.where(slow, unknown_bound(), state.bound)),
                         params, opt_state)
    return params, opt_state, bound, fast | checked


def jit_train_step(config, factory: StateFactory, mesh):
    """`config`'s train step jitted as every run uses it (`train`, `mmjax compile`, `mmjax bench`): (state,
    global batch) -> (new state, metrics); the state sharded as `factory.shardings`, the batch over the batch
    axes, the metrics replicated, and the input state donated (its buffers become the new state's)."""
    return jax.jit(
        make_train_step(factory.model, factory.tx, factory.schedule, objective=factory.task.objective(config, mesh),
                        trainable=factory.trainable, bound_rule=factory.bound_rule),
        in_shardings=(factory.shardings, shd.batch_sharding(mesh)),
        out_shardings=(factory.shardings, shd.replicated(mesh)),
        donate_argnums=0,
    )
