"""Contrastive losses against float64 NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.losses import contrastive as losses


def _log_softmax(z, axis):
    z = z - z.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


def np_softmax_loss(x, y, scale):
    logits = scale * np.asarray(x, np.float64) @ np.asarray(y, np.float64).T
    i2t = -np.mean(np.diag(_log_softmax(logits, axis=1)))
    t2i = -np.mean(np.diag(_log_softmax(logits, axis=0)))
    return 0.5 * (i2t + t2i)


def np_sigmoid_loss(x, y, scale, bias):
    logits = scale * np.asarray(x, np.float64) @ np.asarray(y, np.float64).T + bias
    labels = 2.0 * np.eye(len(x)) - 1.0
    log_sigmoid = -np.logaddexp(0.0, -labels * logits)
    return -log_sigmoid.sum() / len(x)


def np_accuracies(x, y):
    sims = np.asarray(x, np.float64) @ np.asarray(y, np.float64).T
    target = np.arange(len(x))
    return np.mean(sims.argmax(1) == target), np.mean(sims.argmax(0) == target)


def _embeddings(seed, batch=8, dim=6, correlated=0.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, dim))
    y = correlated * x + rng.normal(size=(batch, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    return x.astype(np.float32), y.astype(np.float32)


@pytest.mark.parametrize('seed,scale', [(0, 1.0), (1, 14.3), (2, 100.0)])
def test_softmax_matches_numpy(seed, scale):
    x, y = _embeddings(seed, correlated=0.5)
    loss, metrics = losses.softmax_contrastive_loss(jnp.asarray(x), jnp.asarray(y), jnp.float32(scale))
    np.testing.assert_allclose(loss, np_softmax_loss(x, y, scale), rtol=1e-5, atol=1e-5)
    i2t, t2i = np_accuracies(x, y)
    assert float(metrics['i2t_acc']) == pytest.approx(i2t)
    assert float(metrics['t2i_acc']) == pytest.approx(t2i)
    assert 0 < i2t < 1 and 0 < t2i < 1  # the inputs exercise non-trivial accuracies
    assert metrics['loss'] is loss
    assert loss.dtype == jnp.float32


@pytest.mark.parametrize('seed,scale,bias', [(0, 10.0, -10.0), (1, 3.0, 2.5), (2, 1.0, 0.0)])
def test_sigmoid_matches_numpy(seed, scale, bias):
    x, y = _embeddings(seed, correlated=1.0)
    loss, metrics = losses.sigmoid_contrastive_loss(jnp.asarray(x), jnp.asarray(y), jnp.float32(scale),
                                                    jnp.float32(bias))
    np.testing.assert_allclose(loss, np_sigmoid_loss(x, y, scale, bias), rtol=1e-5, atol=1e-5)
    i2t, t2i = np_accuracies(x, y)
    assert float(metrics['i2t_acc']) == pytest.approx(i2t)
    assert float(metrics['t2i_acc']) == pytest.approx(t2i)
    assert float(metrics['logit_bias']) == pytest.approx(bias)


def test_sigmoid_without_bias_is_zero_bias():
    x, y = _embeddings(3)
    no_bias, _ = losses.sigmoid_contrastive_loss(x, y, 5.0)
    zero_bias, _ = losses.sigmoid_contrastive_loss(x, y, 5.0, 0.0)
    with_bias, _ = losses.sigmoid_contrastive_loss(x, y, 5.0, -4.0)
    np.testing.assert_allclose(no_bias, zero_bias, rtol=1e-6)
    assert abs(float(with_bias) - float(no_bias)) > 1e-2


def test_softmax_is_symmetric_in_its_inputs():
    x, y = _embeddings(4, correlated=0.5)
    loss_xy, m_xy = losses.softmax_contrastive_loss(x, y, 9.0)
    loss_yx, m_yx = losses.softmax_contrastive_loss(y, x, 9.0)
    np.testing.assert_allclose(loss_xy, loss_yx, rtol=1e-6)
    assert float(m_xy['i2t_acc']) == float(m_yx['t2i_acc'])
    assert float(m_xy['t2i_acc']) == float(m_yx['i2t_acc'])


def test_sigmoid_is_symmetric_in_its_inputs():
    x, y = _embeddings(5, correlated=0.5)
    np.testing.assert_allclose(losses.sigmoid_contrastive_loss(x, y, 9.0, -2.0)[0],
                               losses.sigmoid_contrastive_loss(y, x, 9.0, -2.0)[0], rtol=1e-6)


def test_losses_are_permutation_invariant_over_pairs():
    x, y = _embeddings(6, correlated=0.5)
    perm = np.random.default_rng(0).permutation(len(x))
    for fn in (lambda a, b: losses.softmax_contrastive_loss(a, b, 7.0),
               lambda a, b: losses.sigmoid_contrastive_loss(a, b, 7.0, -3.0)):
        np.testing.assert_allclose(fn(x, y)[0], fn(x[perm], y[perm])[0], rtol=1e-5)


def test_perfectly_aligned_pairs():
    x = np.eye(4, dtype=np.float32)
    loss, metrics = losses.softmax_contrastive_loss(x, x, 100.0)
    assert float(loss) < 1e-6
    assert float(metrics['i2t_acc']) == 1.0 and float(metrics['t2i_acc']) == 1.0
    # Shuffled pairs: accuracies fall to 0 and the loss is large.
    loss, metrics = losses.softmax_contrastive_loss(x, np.roll(x, 1, axis=0), 100.0)
    assert float(loss) > 50.0
    assert float(metrics['i2t_acc']) == 0.0 and float(metrics['t2i_acc']) == 0.0


def _finite_difference(fn, value, h=1e-4):
    return (fn(value + h) - fn(value - h)) / (2 * h)


def test_gradients_are_finite_and_match_numpy():
    x, y = _embeddings(7, correlated=1.0)
    scale, bias = 6.0, -3.0

    def softmax(xx, yy, s):
        return losses.softmax_contrastive_loss(xx, yy, s)[0]

    def sigmoid(xx, yy, s, b):
        return losses.sigmoid_contrastive_loss(xx, yy, s, b)[0]

    grads = jax.grad(softmax, argnums=(0, 1, 2))(jnp.asarray(x), jnp.asarray(y), jnp.float32(scale))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
    assert float(jnp.abs(grads[0]).sum()) > 0
    np.testing.assert_allclose(grads[2], _finite_difference(lambda s: np_softmax_loss(x, y, s), scale),
                               rtol=1e-4, atol=1e-5)

    grads = jax.grad(sigmoid, argnums=(0, 1, 2, 3))(jnp.asarray(x), jnp.asarray(y), jnp.float32(scale),
                                                    jnp.float32(bias))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
    np.testing.assert_allclose(grads[2], _finite_difference(lambda s: np_sigmoid_loss(x, y, s, bias), scale),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grads[3], _finite_difference(lambda b: np_sigmoid_loss(x, y, scale, b), bias),
                               rtol=1e-4, atol=1e-5)

    # Gradient w.r.t. one embedding entry against a float64 central difference of the reference.
    def np_loss_of_x00(v):
        xx = x.astype(np.float64).copy()
        xx[0, 0] = v
        return np_softmax_loss(xx, y, scale)
    grad_x = jax.grad(softmax)(jnp.asarray(x), jnp.asarray(y), jnp.float32(scale))
    np.testing.assert_allclose(grad_x[0, 0], _finite_difference(np_loss_of_x00, float(x[0, 0])),
                               rtol=1e-4, atol=1e-5)


def test_low_precision_inputs_are_computed_in_float32():
    x, y = _embeddings(8)
    loss, metrics = losses.softmax_contrastive_loss(jnp.asarray(x, jnp.bfloat16), jnp.asarray(y, jnp.bfloat16),
                                                    jnp.asarray(10.0, jnp.bfloat16))
    assert loss.dtype == jnp.float32
    xb = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)
    yb = np.asarray(jnp.asarray(y, jnp.bfloat16), np.float64)
    np.testing.assert_allclose(loss, np_softmax_loss(xb, yb, 10.0), rtol=1e-5)
    loss, _ = losses.sigmoid_contrastive_loss(jnp.asarray(x, jnp.bfloat16), jnp.asarray(y, jnp.bfloat16), 10.0, -5.0)
    assert loss.dtype == jnp.float32


def _outputs(seed, bias=None):
    x, y = _embeddings(seed, correlated=1.0)
    out = {'embeddings': {'image': jnp.asarray(x), 'text': jnp.asarray(y)}, 'logit_scale': jnp.float32(12.0)}
    if bias is not None:
        out['logit_bias'] = jnp.float32(bias)
    return out, x, y


def test_contrastive_loss_dispatch():
    out, x, y = _outputs(9, bias=-6.0)
    loss, metrics = losses.contrastive_loss(out, 'softmax')
    np.testing.assert_allclose(loss, np_softmax_loss(x, y, 12.0), rtol=1e-5)  # bias ignored by softmax
    assert {'loss', 'i2t_acc', 't2i_acc'} <= set(metrics)
    loss, metrics = losses.contrastive_loss(out, 'sigmoid')
    np.testing.assert_allclose(loss, np_sigmoid_loss(x, y, 12.0, -6.0), rtol=1e-5)
    assert {'loss', 'i2t_acc', 't2i_acc'} <= set(metrics)
    out, x, y = _outputs(9)
    loss, _ = losses.contrastive_loss(out, 'sigmoid')
    np.testing.assert_allclose(loss, np_sigmoid_loss(x, y, 12.0, 0.0), rtol=1e-5)


def test_contrastive_loss_under_jit():
    out, x, y = _outputs(10, bias=-2.0)
    for name, ref in (('softmax', np_softmax_loss(x, y, 12.0)), ('sigmoid', np_sigmoid_loss(x, y, 12.0, -2.0))):
        loss, _ = jax.jit(losses.contrastive_loss, static_argnames='loss_name')(out, loss_name=name)
        np.testing.assert_allclose(loss, ref, rtol=1e-5)


def test_pairwise_loss_names_metrics_by_modality():
    x, y = _embeddings(11)
    out = {'embeddings': {'image': x, 'audio': y}, 'logit_scale': 5.0}
    loss, metrics = losses.pairwise_contrastive_loss(out, 'image', 'audio', 'softmax')
    assert {'i2a_acc', 'a2i_acc'} <= set(metrics)
    np.testing.assert_allclose(loss, np_softmax_loss(x, y, 5.0), rtol=1e-5)


def test_errors():
    out, x, y = _outputs(12)
    with pytest.raises(ValueError, match="Unknown contrastive loss 'clip'"):
        losses.contrastive_loss(out, 'clip')
    with pytest.raises(ValueError, match='equal shapes'):
        losses.softmax_contrastive_loss(x, y[:-1], 1.0)
    with pytest.raises(ValueError, match='equal shapes'):
        losses.sigmoid_contrastive_loss(x, y[:, :-1], 1.0, 0.0)
    with pytest.raises(ValueError, match=r'\[B, D\]'):
        losses.softmax_contrastive_loss(x[0], y[0], 1.0)
    with pytest.raises(ValueError, match='logit_scale must be a scalar'):
        losses.softmax_contrastive_loss(x, y, np.ones(2))
    with pytest.raises(ValueError, match='logit_bias must be a scalar'):
        losses.sigmoid_contrastive_loss(x, y, 1.0, np.ones(2))
    with pytest.raises(ValueError, match="no 'text' embeddings"):
        losses.contrastive_loss({'embeddings': {'image': x}, 'logit_scale': 1.0}, 'softmax')
