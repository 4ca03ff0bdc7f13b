"""A step on 1 device equals the same step on 8 devices under each mesh layout, and parameter
shardings follow the config's logical rules."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from test_config import tiny

from mmjax import config as config_lib
from mmjax.runtime import sharding as shd
from mmjax.tasks import make_objective
from mmjax.training.state import StateFactory
from mmjax.training.step import make_train_step

LAYOUTS = {"data=8": (8, 1, 1), "fsdp=8": (1, 8, 1), "data=2,fsdp=2,tensor=2": (2, 2, 2)}


def _config(layout):
    d, f, t = layout
    c = tiny()
    return config_lib.apply_overrides(c, [f"config.mesh.data={d}", f"config.mesh.fsdp={f}",
                                          f"config.mesh.tensor={t}"])


def _batch(config, n=16, seed=0):
    rng = np.random.default_rng(seed)
    img = config.model.image
    text = rng.integers(3, 200, size=(n, config.model.text.max_len)).astype(np.int32)
    lengths = rng.integers(5, config.model.text.max_len, size=n)
    for i, L in enumerate(lengths):
        text[i, 0], text[i, L - 1], text[i, L:] = 1, 2, 0
    return {"image": rng.normal(size=(n, img.image_size, img.image_size, img.channels)).astype(np.float32),
            "text": text}


def _one_step(config, devices, host_batch=None):
    """One jitted train step of `config` on `devices` from its fresh state, on `host_batch` (default
    `_batch(config)`). Returns (params, metrics) on the host and the new state."""
    mesh = shd.make_mesh(config.mesh, devices)
    factory = StateFactory(config, mesh)
    state = factory.init(config.seed)
    step = jax.jit(make_train_step(factory.model, factory.tx, factory.schedule,
                                   make_objective(config, mesh), trainable=factory.trainable),
                   in_shardings=(factory.shardings, shd.batch_sharding(mesh)),
                   out_shardings=(factory.shardings, shd.replicated(mesh)))
    with jax.set_mesh(mesh), nn.logical_axis_rules(factory.rules):
        batch = shd.global_batch(_batch(config) if host_batch is None else host_batch, mesh)
        state, metrics = step(state, batch)
    return jax.device_get(state.params), jax.device_get(metrics), state


@pytest.fixture(scope="module")
def reference():
    c = _config((1, 1, 1))
    return _one_step(c, jax.devices()[:1])


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_step_on_8_devices_equals_1_device(reference, name):
    ref_params, ref_metrics, _ = reference
    params, metrics, _ = _one_step(_config(LAYOUTS[name]), jax.devices())
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], atol=1e-5, rtol=1e-5)
    flat_ref = jax.tree_util.tree_leaves_with_path(ref_params)
    flat = jax.tree.leaves(params)
    for (path, a), b in zip(flat_ref, flat):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=0, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_chunked_loss_step_on_8_devices_equals_plain_on_1_device(loss):
    def cfg(layout, impl):
        c = _config(layout)
        return config_lib.apply_overrides(c, [f"config.model.loss={loss}",
                                              "config.model.logit_bias_init=-10.0",
                                              f"config.model.loss_impl={impl}",
                                              "config.model.loss_chunk_size=2"])
    ref_params, ref, _ = _one_step(cfg((1, 1, 1), "plain"), jax.devices()[:1])
    params, got, _ = _one_step(cfg((2, 2, 2), "chunked"), jax.devices())
    np.testing.assert_allclose(got["loss"], ref["loss"], atol=1e-5, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(params)):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)


def test_param_shardings_follow_logical_rules():
    config = _config((2, 2, 2))
    mesh = shd.make_mesh(config.mesh, jax.devices())
    factory = StateFactory(config, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(factory.rules):
        boxed = jax.eval_shape(factory._init_boxed, jax.random.key(0))
    rules = dict(factory.rules)
    state = factory.init(0)
    names = jax.tree.leaves(nn.get_partition_spec(boxed.params),
                            is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    arrays = jax.tree.leaves(state.params)
    checked = 0
    seen_axes = set()
    for logical, arr in zip(names, arrays):
        expected = tuple(rules[n] if n is not None else None for n in logical)
        actual = tuple(arr.sharding.spec) + (None,) * (arr.ndim - len(arr.sharding.spec))
        assert actual == expected, (logical, actual)
        # Each shard holds exactly its slice: shape divided by the mesh axes of its dims.
        shard_shape = arr.addressable_shards[0].data.shape
        for dim, axis in enumerate(expected):
            size = mesh.shape[axis] if axis else 1
            assert shard_shape[dim] == arr.shape[dim] // size
            seen_axes.add(axis)
        checked += 1
    assert checked == len(arrays) > 10
    assert {"fsdp", "tensor"} <= seen_axes  # the tiny model does shard over both


def test_optimizer_state_sharded_like_params():
    config = _config((1, 8, 1))
    mesh = shd.make_mesh(config.mesh, jax.devices())
    factory = StateFactory(config, mesh)
    state = factory.init(0)
    by_shape = {}
    for p in jax.tree.leaves(state.params):
        by_shape.setdefault(p.shape, set()).add(p.sharding.spec)
    mu = [x for x in jax.tree.leaves(state.opt_state) if x.ndim >= 2]
    assert mu, "AdamW state should hold per-parameter moments"
    for m in mu:
        assert m.sharding.spec in by_shape[m.shape]
