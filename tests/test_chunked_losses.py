"""Chunked/ring contrastive losses equal their plain twins (values, accuracies, gradients) and stay O(B*D)."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mmjax.losses import chunked as chunked_losses
from mmjax.losses import contrastive as losses
from mmjax.runtime.sharding import batch_sharding, make_mesh

B, D = 64, 16
TOL = dict(rtol=1e-5, atol=1e-5)
LAYOUTS = {  # name -> (data, fsdp, tensor, number of devices)
        '1dev': (1, 1, 1, 1),
        'data8': (8, 1, 1, 8),
        'fsdp8': (1, 8, 1, 8),
        'd2f2t2': (2, 2, 2, 8),
}
SOFTMAX_ARGS = (10.0,)
SIGMOID_ARGS = (10.0, -3.0)


@functools.cache
def _mesh(layout):
    data, fsdp, tensor, count = LAYOUTS[layout]
    return make_mesh(ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor)), jax.devices()[:count])


def _embeddings(seed, batch=B, dim=D, correlated=0.6):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, dim))
    y = correlated * x + rng.normal(size=(batch, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)


def _plain(kind):
    if kind == 'softmax':
        return losses.softmax_contrastive_loss
    return losses.sigmoid_contrastive_loss


def _chunked(kind, mesh, chunk_size):
    if kind == 'softmax':
        return functools.partial(chunked_losses.chunked_softmax_contrastive_loss, mesh=mesh, chunk_size=chunk_size)
    return functools.partial(chunked_losses.chunked_sigmoid_contrastive_loss, mesh=mesh, chunk_size=chunk_size)


def _value_and_grads(loss_fn, x, y, scalars, in_sharding=None):
    """jit(value_and_grad) w.r.t. x, y and every scalar; x, y placed with ``in_sharding`` (as in a train step)."""
    argnums = tuple(range(2 + len(scalars)))
    fn = jax.value_and_grad(loss_fn, argnums=argnums, has_aux=True)
    if in_sharding is not None:
        fn = jax.jit(fn, in_shardings=(in_sharding, in_sharding) + (None,) * len(scalars))
    else:
        fn = jax.jit(fn)
    return fn(x, y, *(jnp.float32(s) for s in scalars))


@functools.cache
def _reference(kind, seed, scalars):
    x, y = _embeddings(seed)
    return (x, y), _value_and_grads(_plain(kind), x, y, scalars)


def _assert_same(got, want, grad_names):
    (loss, metrics), grads = got
    (ref_loss, ref_metrics), ref_grads = want
    np.testing.assert_allclose(loss, ref_loss, **TOL)
    assert loss.dtype == jnp.float32 and loss.shape == ()
    assert set(metrics) == set(ref_metrics)
    for key in ref_metrics:
        np.testing.assert_allclose(metrics[key], ref_metrics[key], err_msg=key, **TOL)
    assert 0 < float(ref_metrics['i2t_acc']) < 1 and 0 < float(ref_metrics['t2i_acc']) < 1  # non-trivial
    for name, g, ref in zip(grad_names, grads, ref_grads):
        assert g.shape == ref.shape, name
        np.testing.assert_allclose(g, ref, err_msg=f'd loss / d {name}', **TOL)
        assert float(jnp.max(jnp.abs(ref))) > 1e-4, name  # the gradient is exercised


@pytest.mark.parametrize('layout', list(LAYOUTS))
@pytest.mark.parametrize('kind', ['softmax', 'sigmoid'])
def test_equals_plain_loss_and_grads(kind, layout):
    scalars = SOFTMAX_ARGS if kind == 'softmax' else SIGMOID_ARGS
    (x, y), want = _reference(kind, 0, scalars)
    mesh = _mesh(layout)
    # chunk 4: several tiles per visiting block on every layout (per-device batch 64, 8 or 16).
    with jax.set_mesh(mesh):
        got = _value_and_grads(_chunked(kind, mesh, 4), x, y, scalars, in_sharding=batch_sharding(mesh))
    _assert_same(got, want, ('x', 'y', 'logit_scale', 'logit_bias'))
    for g in got[1][:2]:  # embedding gradients come back batch-sharded, like the embeddings
        assert g.sharding.is_equivalent_to(batch_sharding(mesh), 2)


@pytest.mark.parametrize('layout', ['1dev', 'd2f2t2'])
def test_softmax_stable_at_large_scale(layout):
    """logit_scale 100 (CLIP's clip value): the streaming log-sum-exp must not overflow or lose precision."""
    (x, y), want = _reference('softmax', 1, (100.0,))
    mesh = _mesh(layout)
    got = _value_and_grads(_chunked('softmax', mesh, 8), x, y, (100.0,))
    _assert_same(got, want, ('x', 'y', 'logit_scale'))


def test_sigmoid_without_bias_and_other_names():
    x, y = _embeddings(2)
    mesh = _mesh('data8')
    loss, metrics = chunked_losses.chunked_sigmoid_contrastive_loss(x, y, 5.0, None, mesh=mesh, chunk_size=8,
                                                                    names=('i', 'a'))
    ref_loss, ref_metrics = losses.sigmoid_contrastive_loss(x, y, 5.0, None, names=('i', 'a'))
    np.testing.assert_allclose(loss, ref_loss, **TOL)
    assert set(metrics) == set(ref_metrics) and 'a2i_acc' in metrics
    np.testing.assert_allclose(metrics['i2a_acc'], ref_metrics['i2a_acc'])
    assert float(metrics['logit_bias']) == 0.0


@pytest.mark.parametrize('loss_name', ['softmax', 'sigmoid'])
def test_contrastive_loss_chunked_mirrors_plain_dispatch(loss_name):
    x, y = _embeddings(3)
    outputs = {'embeddings': {'image': x, 'text': y}, 'logit_scale': jnp.float32(7.0)}
    if loss_name == 'sigmoid':
        outputs['logit_bias'] = jnp.float32(-2.0)
    mesh = _mesh('1dev')
    loss, metrics = chunked_losses.contrastive_loss_chunked(outputs, loss_name, mesh, 16)
    ref_loss, ref_metrics = losses.contrastive_loss(outputs, loss_name)
    np.testing.assert_allclose(loss, ref_loss, **TOL)
    assert set(metrics) == set(ref_metrics)
    for key in ref_metrics:
        np.testing.assert_allclose(metrics[key], ref_metrics[key], err_msg=key, **TOL)


def test_dispatch_errors():
    x, y = _embeddings(0)
    outputs = {'embeddings': {'image': x, 'text': y}, 'logit_scale': jnp.float32(1.0)}
    with pytest.raises(ValueError, match='Unknown contrastive loss'):
        chunked_losses.contrastive_loss_chunked(outputs, 'hinge', _mesh('1dev'), 8)
    with pytest.raises(ValueError, match="no 'audio' embeddings"):
        chunked_losses.pairwise_contrastive_loss_chunked(outputs, 'image', 'audio', 'softmax', _mesh('1dev'), 8)


@pytest.mark.parametrize('kind', ['softmax', 'sigmoid'])
def test_chunk_size_errors(kind):
    x, y = _embeddings(0)
    scalars = SOFTMAX_ARGS if kind == 'softmax' else SIGMOID_ARGS
    # data=8: per-device batch 8, not divisible by 3 (nor by 16, larger than it).
    for bad in (3, 16):
        with pytest.raises(ValueError, match=rf'Per-device batch 8 .* not divisible by chunk_size {bad}'):
            _chunked(kind, _mesh('data8'), bad)(x, y, *scalars)
    with pytest.raises(ValueError, match='chunk_size must be a positive int'):
        _chunked(kind, _mesh('1dev'), 0)(x, y, *scalars)
    with pytest.raises(ValueError, match='Global batch 60 is not divisible by the batch ring size 8'):
        _chunked(kind, _mesh('data8'), 4)(x[:60], y[:60], *scalars)
    # d2f2t2: the ring is data*fsdp = 4 (tensor replicated), so the per-device batch is 16, not 8.
    with pytest.raises(ValueError, match='Per-device batch 16 .* not divisible by chunk_size 5'):
        _chunked(kind, _mesh('d2f2t2'), 5)(x, y, *scalars)


def _temp_bytes(loss_fn, batch, dim, scalars, sharding=None):
    """Compiled (never run) temp bytes per device of jit(value_and_grad(loss)) for [batch, dim] embeddings."""
    emb = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=sharding)
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    fn = jax.value_and_grad(lambda x, y, *s: loss_fn(x, y, *s)[0], argnums=tuple(range(2 + len(scalars))))
    return jax.jit(fn).lower(emb, emb, *(scalar,) * len(scalars)).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize('kind', ['softmax', 'sigmoid'])
def test_memory_grows_with_batch_not_batch_squared(kind):
    scalars = SOFTMAX_ARGS if kind == 'softmax' else SIGMOID_ARGS
    batch, dim, chunk = 8192, 32, 256
    logits_bytes = batch * batch * 4
    mesh = _mesh('1dev')
    plain = _temp_bytes(_plain(kind), batch, dim, scalars)
    chunked = _temp_bytes(_chunked(kind, mesh, chunk), batch, dim, scalars)
    chunked_2x = _temp_bytes(_chunked(kind, mesh, chunk), 2 * batch, dim, scalars)
    assert plain >= logits_bytes  # the plain loss holds at least one [B, B] float32 buffer
    assert chunked < logits_bytes / 50, (chunked, logits_bytes)
    assert chunked_2x < 2.5 * chunked  # linear in B (a B^2 term would quadruple)
    # On the 8-device ring the per-device working set is O(B/8 * D): far below one device's B^2/8 share.
    ring = _mesh('data8')
    per_device = _temp_bytes(_chunked(kind, ring, chunk), 2 * batch, dim, scalars, sharding=batch_sharding(ring))
    assert per_device < 4 * logits_bytes / 8 / 25, (per_device, 4 * logits_bytes)
