"""Tests for mmjax.losses.fusion: ITM negatives and loss, MLM masking and loss, classification loss."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from mmjax.losses import contrastive as losses  # noqa: E402
from mmjax.losses import fusion as objectives  # noqa: E402
from mmjax.models import fusion_model  # noqa: E402

_batched_negatives = jax.jit(jax.vmap(fusion_model.itm_negatives, in_axes=(None, 0)))
_hardest_negatives = jax.jit(fusion_model.itm_negatives)


def sample_negatives(sim, trials, seed=0):
    """int32 [trials, B]: itm_negatives over `trials` keys in one vmapped, jitted call."""
    return np.asarray(_batched_negatives(sim, jax.random.split(jax.random.key(seed), trials)))


# --------------------------------------------------------------------------------------------- ITM negatives

@pytest.mark.parametrize('b', [2, 3, 8])
def test_itm_negatives_are_never_the_positive_pair(b):
    rng = np.random.default_rng(b)
    sims = [rng.normal(size=(b, b)) * 5,
            np.eye(b) * 1e4,  # the positive pair dominates the softmax: still never chosen
            np.where(np.eye(b, dtype=bool), 0.0, -1e30),  # negatives nearly impossible: still one of them
            np.ones((b, b))]  # duplicate captions: every entry ties with the positive
    for sim in sims:
        neg = sample_negatives(jnp.asarray(sim, jnp.float32), trials=500)
        assert neg.shape == (500, b) and neg.dtype == np.int32
        assert np.all((neg >= 0) & (neg < b))
        assert not np.any(neg == np.arange(b)[None]), sim
        hardest = np.asarray(_hardest_negatives(jnp.asarray(sim, jnp.float32)))
        assert not np.any(hardest == np.arange(b))
    # A NaN similarity still never yields the positive pair.
    nan_sim = jnp.full((b, b), jnp.nan)
    assert not np.any(sample_negatives(nan_sim, trials=50) == np.arange(b)[None])


def test_itm_negatives_follow_softmax_without_diagonal_and_duplicates_are_kept():
    sim = np.array([[9.0, 1.0, 0.0, 1.0],   # row 0: columns 1 and 3 tie (a duplicate caption), 0 is the positive
                    [0.0, 5.0, 2.0, 0.0],
                    [1.0, 1.0, 1.0, 1.0],
                    [3.0, 0.0, 0.0, 0.0]], np.float32)
    neg = sample_negatives(jnp.asarray(sim), trials=8000)
    for i in range(4):
        logits = np.where(np.arange(4) == i, -np.inf, sim[i])
        p = np.exp(logits - logits.max())
        p /= p.sum()
        freq = np.bincount(neg[:, i], minlength=4) / len(neg)
        np.testing.assert_allclose(freq, p, atol=0.025)
    # A duplicate of the positive's caption (same similarity, j != i) is a legitimate draw.
    assert np.mean(neg[:, 0] == 3) > 0.3
    np.testing.assert_array_equal(_hardest_negatives(jnp.asarray(sim)), [1, 2, 0, 0])  # hardest (first max)


def test_itm_negatives_reject_bad_shapes():
    with pytest.raises(ValueError, match='square'):
        fusion_model.itm_negatives(jnp.zeros((3, 4)))
    with pytest.raises(ValueError, match='at least 2'):
        fusion_model.itm_negatives(jnp.zeros((1, 1)), jax.random.key(0))


def test_itm_loss_matches_binary_cross_entropy():
    pos = jnp.asarray([2.0, -1.0, 0.5])
    neg = jnp.asarray([-3.0, 1.5, -0.2, 0.1, -1.0, 4.0])
    loss, metrics = objectives.itm_loss(pos, neg)
    sig = lambda x: 1 / (1 + np.exp(-np.asarray(x, np.float64)))  # noqa: E731
    want = np.mean(np.concatenate([-np.log(sig(pos)), -np.log(1 - sig(neg))]))
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(metrics['itm_acc'], (2 + 3) / 9, rtol=1e-6)
    assert metrics['itm_loss'] == loss


# --------------------------------------------------------------------------------------------- MLM

def byte_tokens(lengths, total=24, seed=0):
    rng = np.random.default_rng(seed)
    out = np.zeros((len(lengths), total), np.int32)
    for i, n in enumerate(lengths):
        out[i, 0], out[i, n - 1] = 1, 2
        out[i, 1:n - 1] = rng.integers(3, 259, n - 2)
    return jnp.asarray(out)


def test_mask_tokens_never_touches_special_tokens_and_follows_bert_proportions():
    tokens = byte_tokens([24, 10, 3, 17] * 16)
    mask_id, vocab = 259, 300
    masked, targets, weights = jax.jit(objectives.mask_tokens, static_argnums=(2, 3, 4))(
        tokens, jax.random.key(0), 0.3, mask_id, vocab)
    tokens, masked, targets, weights = map(np.asarray, (tokens, masked, targets, weights))
    special = np.isin(tokens, [0, 1, 2])
    selected = weights > 0
    assert masked.dtype == np.int32 and targets.dtype == np.int32 and weights.dtype == np.float32
    assert not np.any(selected & special)
    np.testing.assert_array_equal(masked[special], tokens[special])  # pad, BOS and EOT untouched
    np.testing.assert_array_equal(masked[~selected], tokens[~selected])
    np.testing.assert_array_equal(targets, np.where(selected, tokens, 0))
    assert set(np.unique(weights)) == {0.0, 1.0}
    assert abs(selected.sum() / (~special).sum() - 0.3) < 0.05
    became_mask = masked[selected] == mask_id
    kept = masked[selected] == tokens[selected]
    randomised = ~became_mask & ~kept
    assert abs(became_mask.mean() - 0.8) < 0.06 and abs(randomised.mean() - 0.1) < 0.05
    assert np.all(masked[selected][randomised] >= 3) and np.all(masked[selected][randomised] < vocab)
    assert not np.any(np.isin(masked[selected][randomised], [0, 1, 2, mask_id]))


def test_mask_tokens_edge_probabilities_and_errors():
    tokens = byte_tokens([24, 10, 3, 17])
    special = np.isin(np.asarray(tokens), [0, 1, 2])
    _, _, none = objectives.mask_tokens(tokens, jax.random.key(1), 0.0, 259, 300)
    assert float(none.sum()) == 0.0
    masked, _, every = objectives.mask_tokens(tokens, jax.random.key(1), 1.0, 259, 300, replace_probs=(1.0, 0.0))
    np.testing.assert_array_equal(np.asarray(every) > 0, ~special)
    np.testing.assert_array_equal(np.asarray(masked), np.where(special, tokens, 259))
    with pytest.raises(ValueError, match='mask_id'):
        objectives.mask_tokens(tokens, jax.random.key(1), 0.15, 300, 300)
    with pytest.raises(ValueError, match='mask_id'):
        objectives.mask_tokens(tokens, jax.random.key(1), 0.15, 2, 300)
    with pytest.raises(ValueError, match='mask_prob'):
        objectives.mask_tokens(tokens, jax.random.key(1), 1.5, 259, 300)


def reference_mlm(logits, targets, weights):
    logits = np.asarray(logits, np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]
    w = np.asarray(weights, np.float64)
    return (w * nll).sum() / w.sum()


def test_mlm_loss_scores_only_masked_positions():
    k1, k2, k3, k4 = jax.random.split(jax.random.key(2), 4)
    logits = jax.random.normal(k1, (3, 6, 11)) * 3
    targets = jax.random.randint(k2, (3, 6), 0, 11)
    weights = (jax.random.uniform(k3, (3, 6)) < 0.4).astype(jnp.float32).at[0, 0].set(1.0)
    loss, metrics = objectives.mlm_loss(logits, targets, weights)
    np.testing.assert_allclose(loss, reference_mlm(logits, targets, weights), rtol=1e-5)
    assert float(metrics['mlm_count']) == float(weights.sum())
    scored = weights[..., None] > 0
    for junk in (jax.random.normal(k4, logits.shape) * 100, jnp.full(logits.shape, jnp.nan),
                 jnp.full(logits.shape, jnp.inf)):
        changed = jnp.where(scored, logits, junk)  # logits at unmasked positions replaced
        loss2, metrics2 = objectives.mlm_loss(changed, targets, weights)
        np.testing.assert_allclose(loss2, loss, rtol=1e-6)
        np.testing.assert_allclose(metrics2['mlm_acc'], metrics['mlm_acc'])
    # Changing a masked position's logits does change the loss.
    bumped = logits.at[0, 0, targets[0, 0]].add(5.0)
    assert abs(float(objectives.mlm_loss(bumped, targets, weights)[0]) - float(loss)) > 1e-3
    # The gradient reaches masked positions only.
    grad = jax.grad(lambda lg: objectives.mlm_loss(lg, targets, weights)[0])(logits)
    assert np.all(np.asarray(grad)[~np.asarray(scored[..., 0])] == 0)
    assert np.abs(np.asarray(grad)[np.asarray(scored[..., 0])]).sum() > 0
    # Nothing masked: loss 0, not NaN.
    zero, _ = objectives.mlm_loss(logits, targets, jnp.zeros_like(weights))
    assert float(zero) == 0.0


def test_mlm_accuracy():
    logits = jax.nn.one_hot(jnp.asarray([[1, 2, 3]]), 5) * 10
    targets = jnp.asarray([[1, 0, 3]])
    _, metrics = objectives.mlm_loss(logits, targets, jnp.asarray([[1.0, 1.0, 0.0]]))
    np.testing.assert_allclose(metrics['mlm_acc'], 0.5)


# --------------------------------------------------------------------------------------------- classification

def test_classification_loss_matches_reference():
    logits = jax.random.normal(jax.random.key(3), (6, 4)) * 2
    labels = jnp.asarray([0, 3, 1, 1, 2, 0])
    loss, metrics = objectives.classification_loss(logits, labels)
    lg = np.asarray(logits, np.float64)
    logp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
    np.testing.assert_allclose(loss, -logp[np.arange(6), np.asarray(labels)].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics['accuracy'], np.mean(lg.argmax(-1) == np.asarray(labels)))
    with pytest.raises(ValueError, match='labels'):
        objectives.classification_loss(logits, labels[:3])


# --------------------------------------------------------------------------------------------- combined

def test_itm_mlm_loss_is_the_weighted_sum():
    k = jax.random.split(jax.random.key(4), 5)
    emb = jax.random.normal(k[0], (2, 4, 8))
    emb = emb / jnp.linalg.norm(emb, axis=-1, keepdims=True)
    outputs = {'embeddings': {'image': emb[0], 'text': emb[1]}, 'logit_scale': jnp.asarray(10.0),
               'itm_logits_pos': jax.random.normal(k[1], (4,)), 'itm_logits_neg': jax.random.normal(k[2], (8,)),
               'mlm_logits': jax.random.normal(k[3], (4, 5, 7))}
    text = jnp.asarray([[1, 3, 4, 2, 0], [1, 6, 3, 4, 2], [1, 2, 0, 0, 0], [1, 4, 4, 6, 2]], jnp.int32)
    batch = objectives.add_mlm_inputs({'text': text}, k[4], 0.5, 5, 7)
    assert set(batch) == {'text', 'mlm_text', 'mlm_targets', 'mlm_weights'}
    total, metrics = objectives.itm_mlm_loss(outputs, batch, 'softmax', itm_weight=0.5, mlm_weight=2.0)
    c, _ = losses.contrastive_loss(outputs, 'softmax')
    i, _ = objectives.itm_loss(outputs['itm_logits_pos'], outputs['itm_logits_neg'])
    m, _ = objectives.mlm_loss(outputs['mlm_logits'], batch['mlm_targets'], batch['mlm_weights'])
    np.testing.assert_allclose(total, c + 0.5 * i + 2.0 * m, rtol=1e-6)
    assert {'loss', 'contrastive_loss', 'itm_loss', 'itm_acc', 'mlm_loss', 'mlm_acc', 'i2t_acc'} <= set(metrics)
    np.testing.assert_allclose(metrics['loss'], total)
