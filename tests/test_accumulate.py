"""Micro-batched (GradCache) loss and gradients equal the large-batch ones, on 1 and on 8 devices."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from test_config import tiny
from test_sharding import _batch

from mmjax import config as config_lib
from mmjax.losses import contrastive as losses
from mmjax.losses.gradcache import accumulated_value_and_grad, merge_micro_batches, split_micro_batches
from mmjax.runtime import sharding as shd
from mmjax.training.state import StateFactory

BATCH = 16


def _config(loss, layout=(1, 1, 1)):
    d, f, t = layout
    overrides = [f"config.mesh.data={d}", f"config.mesh.fsdp={f}", f"config.mesh.tensor={t}",
                 f"config.model.loss={loss}"]
    if loss == "sigmoid":
        overrides.append("config.model.logit_bias_init=-10.0")
    return config_lib.apply_overrides(tiny(), overrides)


def _grads(config, devices, ks):
    """{k: ((loss, metrics), grads)} for each k (None = plain jax.value_and_grad), on a mesh over devices."""
    mesh = shd.make_mesh(config.mesh, devices)
    factory = StateFactory(config, mesh)
    params = factory.init(config.seed).params
    model = factory.model
    loss_fn = lambda outputs: losses.contrastive_loss(outputs, config.model.loss)  # noqa: E731

    def plain(p, batch):
        return jax.value_and_grad(lambda q: loss_fn(model.apply({"params": q}, batch, train=True)),
                                  has_aux=True)(p)

    results = {}
    with jax.set_mesh(mesh), nn.logical_axis_rules(factory.rules):
        batch = shd.global_batch(_batch(config, BATCH), mesh)
        for k in ks:
            if k is None:
                fn = plain
            else:
                fn = lambda p, b, k=k: accumulated_value_and_grad(model, p, b, loss_fn, k)  # noqa: E731
            step = jax.jit(fn, in_shardings=(factory.shardings.params, shd.batch_sharding(mesh)),
                           out_shardings=shd.replicated(mesh))
            results[k] = jax.device_get(step(params, batch))
    return results


def _assert_equal(got, ref):
    (loss, metrics), grads = got
    (ref_loss, ref_metrics), ref_grads = ref
    np.testing.assert_allclose(loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert set(metrics) == set(ref_metrics)
    for key in ref_metrics:
        np.testing.assert_allclose(metrics[key], ref_metrics[key], atol=1e-5, rtol=1e-5, err_msg=key)
    flat_ref = jax.tree_util.tree_leaves_with_path(ref_grads)
    flat = jax.tree.leaves(grads)
    assert len(flat) == len(flat_ref)
    scale = max(float(np.abs(g).max()) for _, g in flat_ref)
    assert scale > 1e-3  # the gradients are not trivially zero
    for (path, a), b in zip(flat_ref, flat):
        # 1e-5, relative to the leaf's scale when its gradients exceed 1 (they reach ~10): float32 sums run in
        # another order (a sharded large-batch step already differs from the 1-device one by ~2e-5 there).
        tol = 1e-5 * max(1.0, float(np.abs(a).max()))
        np.testing.assert_allclose(b, a, atol=tol, rtol=0, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module", params=["softmax", "sigmoid"])
def one_device(request):
    loss = request.param
    return loss, _grads(_config(loss), jax.devices()[:1], [None, 1, 2, 4])


@pytest.mark.parametrize("k", [1, 2, 4])
def test_micro_batches_equal_large_batch_on_1_device(one_device, k):
    _, results = one_device
    _assert_equal(results[k], results[None])


# Accumulation never looks inside the loss (it always sees the full-batch outputs), so one loss suffices on 8
# devices; both are checked on 1 device above.
@pytest.mark.parametrize("one_device", ["softmax"], indirect=True)
def test_micro_batches_on_8_devices_equal_large_batch(one_device):
    loss, ref = one_device
    results = _grads(_config(loss, (2, 2, 2)), jax.devices(), [None, 2, 4])
    for k in (2, 4):
        _assert_equal(results[k], results[None])  # the same mesh, one big batch
        _assert_equal(results[k], ref[None])  # one device, one big batch


def test_k1_is_plain_value_and_grad_without_a_mesh():
    config = _config("softmax")
    factory = StateFactory(config, shd.make_mesh(config.mesh, jax.devices()[:1]))
    params = factory.init(0).params
    batch = _batch(config, 8)
    loss_fn = lambda o: losses.contrastive_loss(o, "softmax")  # noqa: E731
    # jitted: run eagerly, the reference compiled every primitive on its own (over a minute of the suite)
    ref = jax.jit(jax.value_and_grad(lambda p: loss_fn(factory.model.apply({"params": p}, batch, train=True)),
                                     has_aux=True))(params)
    for k in (1, 2):
        got = jax.jit(lambda p, b, k=k: accumulated_value_and_grad(factory.model, p, b, loss_fn, k))(params, batch)
        _assert_equal(jax.device_get(got), jax.device_get(ref))


def test_split_keeps_rows_on_their_device_and_merge_inverts():
    config = _config("softmax", (2, 2, 2))
    mesh = shd.make_mesh(config.mesh, jax.devices())
    rules = shd.logical_rules(config)
    x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        xs = jax.device_put(x, shd.batch_sharding(mesh))
        split = jax.jit(lambda a: split_micro_batches(a, 2))(xs)
        merged = jax.jit(merge_micro_batches)(split)
    np.testing.assert_array_equal(np.asarray(split), np.stack([x[0::2], x[1::2]]))
    np.testing.assert_array_equal(np.asarray(merged), x)
    # Each device holds micro-batch rows drawn only from its own 4 rows of the batch.
    for shard in split.addressable_shards:
        rows = set((np.asarray(shard.data)[..., 0] // 3).astype(int).ravel().tolist())
        owner = [s for s in xs.addressable_shards if s.device == shard.device][0]
        own = set((np.asarray(owner.data)[:, 0] // 3).astype(int).tolist())
        assert rows == own, (shard.device, rows, own)


def test_bad_num_micro_batches_raise():
    config = _config("softmax", (2, 2, 2))
    mesh = shd.make_mesh(config.mesh, jax.devices())
    factory = StateFactory(config, mesh)
    params = factory.abstract.params
    loss_fn = lambda o: losses.contrastive_loss(o, "softmax")  # noqa: E731
    model = factory.model

    def trace(n, k):
        batch = {key: jax.ShapeDtypeStruct((n,) + v.shape[1:], v.dtype) for key, v in _batch(config, 4).items()}
        return jax.eval_shape(lambda p, b: accumulated_value_and_grad(model, p, b, loss_fn, k), params, batch)

    with jax.set_mesh(mesh), nn.logical_axis_rules(factory.rules):
        with pytest.raises(ValueError, match=r"num_micro_batches=3 does not divide the batch of 16"):
            trace(16, 3)
        # 16 rows over data*fsdp = 4 devices: 4 per device, not divisible by 8.
        with pytest.raises(ValueError, match=r"num_micro_batches=8 does not divide the per-device batch 4"):
            trace(16, 8)
        with pytest.raises(ValueError, match=r"positive int"):
            trace(16, 0)
        trace(16, 4)  # 1 row per device per micro-batch is fine
