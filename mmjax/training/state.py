"""The train state, born sharded.

`StateFactory` holds what is needed to create or restore a TrainState on a mesh: the model, the
optimizer, the abstract (shape-only) state with its shardings. Training, evaluation and the
inference API all restore checkpoints through it, so a checkpoint restores onto any mesh.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from mmjax.models.layers import strip_boxes
from mmjax.runtime import sharding as shd
from mmjax.tasks import Task, get_task
from mmjax.training import finetune
from mmjax.training.optim import UNKNOWN_BOUND, adam_moments, build_optimizer, state_bound


def unknown_bound() -> jax.Array:
    """`TrainState.bound` of a state nothing is known about."""
    return jnp.full((3,), UNKNOWN_BOUND, jnp.float32)


@flax.struct.dataclass
class TrainState:
    """step: int32 scalar; params: model parameters; opt_state: the optax state.

    bound: float32 [3], bounds of the state's values that the train step carries from step to step (max |param|,
    max |Adam mu|, max Adam nu; `mmjax.training.optim.StateBound`), so that it can prove an update finite without
    reading the state again. Derived data, not part of a checkpoint (`saved`): a state that does not come out of
    the step (from `StateFactory.init`, a restore, or built or changed by hand) must carry the unknown bound (inf,
    the default), and the step then checks its first update exactly. Replacing params or opt_state of a state
    from the step: `.replace(..., bound=unknown_bound())`.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    bound: Any = dataclasses.field(default_factory=unknown_bound)

    def bound_covers_state(self) -> bool:
        """Whether `bound` describes every floating-point value of the state: it is carried, and those values are
        float32 parameters and Adam's moments (what `StateBound` bounds). Static: shapes and dtypes only."""
        return self.bound is not None and adam_moments(self.opt_state) is not None and all(
            x.dtype == jnp.float32 for x in jax.tree.leaves(self.params) if jnp.issubdtype(x.dtype, jnp.floating))

    def proven_finite(self) -> bool:
        """Whether the carried bound proves every floating-point value of the state finite, without reading the
        state: it covers the state (`bound_covers_state`) and is finite."""
        if not self.bound_covers_state():
            return False
        bound = self.bound.addressable_data(0) if isinstance(self.bound, jax.Array) else self.bound
        return bool(np.all(np.isfinite(np.asarray(bound))))

    def saved(self) -> SavedState:
        """What a checkpoint holds of this state: all but the bound."""
        return SavedState(step=self.step, params=self.params, opt_state=self.opt_state)


@flax.struct.dataclass
class SavedState:
    """The part of a TrainState a checkpoint holds (laid out as TrainState was before it carried a bound)."""

    step: jax.Array
    params: Any
    opt_state: Any


def build_task_model(config) -> nn.Module:
    """The model of `config.task` (its Task's `build_model`), with the fine-tuning mode's modules."""
    return get_task(config).build_model(finetune.model_config(config))


@dataclasses.dataclass
class StateFactory:
    """Builds the model and optimizer from `config` and knows the state's shardings on `mesh`."""

    config: Any
    mesh: Mesh
    task: Task = dataclasses.field(init=False)
    model: nn.Module = dataclasses.field(init=False)
    tx: optax.GradientTransformation = dataclasses.field(init=False)
    schedule: Callable = dataclasses.field(init=False)
    rules: tuple = dataclasses.field(init=False)
    shardings: Any = dataclasses.field(init=False)
    abstract: Any = dataclasses.field(init=False)
    trainable: Any = dataclasses.field(init=False)  # tree of bools like the params: False where frozen
    bound_rule: Any = dataclasses.field(init=False)  # the optimizer's StateBound, or None (`TrainState.bound`)

    def __post_init__(self):
        self.rules = shd.logical_rules(self.config)
        self.task = get_task(self.config)
        self.model = self.task.build_model(finetune.model_config(self.config))  # + the fine-tuning mode's modules
        batch_shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        self._init_batch = self.task.dummy_batch(self.config, batch_shards * self.task.init_examples_per_shard)
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            abstract_params = jax.eval_shape(self._init_params, jax.random.key(0))
            optim_config, plain_params = finetune.optim_config(self.config), strip_boxes(abstract_params)
            self.tx, self.schedule = build_optimizer(optim_config, plain_params, self.config.train.steps)
            self.trainable = finetune.trainable_mask(plain_params, optim_config["freeze_rules"])
            self.bound_rule = state_bound(optim_config, plain_params)
            boxed = jax.eval_shape(self._init_boxed, jax.random.key(0))
        self.shardings = shd.tree_shardings(boxed, self.mesh, self.rules)
        self.abstract = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            strip_boxes(boxed), self.shardings)

    def _init_params(self, rng):
        batch = {k: jnp.zeros(v.shape, v.dtype) for k, v in self._init_batch.items()}
        return self.model.init(rng, batch)["params"]

    def _init_boxed(self, rng) -> TrainState:
        """The state with logical-axis boxes kept, so the optimizer state inherits them."""
        params = self._init_params(rng)
        opt_state = self.tx.init(params)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)

    def init(self, seed: int) -> TrainState:
        """A freshly initialised state, each array created directly in its shards."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            init = jax.jit(lambda r: nn.unbox(self._init_boxed(r)), out_shardings=self.shardings)
            return init(jax.random.key(seed))

    def param_count(self) -> int:
        return int(sum(np.prod(x.shape) for x in jax.tree.leaves(self.abstract.params)))
