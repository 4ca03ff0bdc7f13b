"""Contrastive losses over a global batch of paired embeddings.

Every loss here is plain ``jnp`` over the full (global) batch: under ``jax.jit`` with sharded inputs XLA inserts the
collectives, so the same code is correct on one device and on a mesh. All math runs in float32 whatever the
embedding dtype.

Shapes: ``x``, ``y`` are ``[B, D]`` embeddings of two modalities whose row ``i`` is a matching pair; ``logit_scale``
(already exponentiated) and ``logit_bias`` are scalars. Each loss returns ``(loss scalar, metrics dict)``.

Metric names use the first letter of each modality: for the pair (image, text) they are ``i2t_acc`` (row-wise top-1
retrieval of the matching text for each image) and ``t2i_acc``. A pair of other modalities (e.g. image, audio) goes
through the same :func:`pairwise_contrastive_loss` and gets ``i2a_acc`` / ``a2i_acc``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Metrics = dict[str, jax.Array]


def check_pair(x: jax.Array, y: jax.Array, logit_scale: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Validates shapes and casts to float32. x, y: [B, D]; logit_scale: scalar."""
    if x.ndim != 2 or y.ndim != 2:
        raise ValueError(f'Contrastive embeddings must be [B, D]; got x {x.shape} and y {y.shape}.')
    if x.shape != y.shape:
        raise ValueError(f'Contrastive embeddings must have equal shapes [B, D]; got x {x.shape} and y {y.shape}.')
    if jnp.ndim(logit_scale) != 0:
        raise ValueError(f'logit_scale must be a scalar; got shape {jnp.shape(logit_scale)}.')
    return x.astype(jnp.float32), y.astype(jnp.float32), jnp.asarray(logit_scale, jnp.float32)


def _retrieval_metrics(logits: jax.Array, names: tuple[str, str]) -> Metrics:
    """Top-1 retrieval accuracies in both directions. logits: [B, B] with matches on the diagonal."""
    a, b = names
    target = jnp.arange(logits.shape[0])
    return {
            f'{a}2{b}_acc': jnp.mean(jnp.argmax(logits, axis=1) == target).astype(jnp.float32),
            f'{b}2{a}_acc': jnp.mean(jnp.argmax(logits, axis=0) == target).astype(jnp.float32),
    }


def softmax_contrastive_loss(x: jax.Array, y: jax.Array, logit_scale: jax.Array,
                             names: tuple[str, str] = ('i', 't')) -> tuple[jax.Array, Metrics]:
    """Symmetric InfoNCE (CLIP).

    Args:
        x: [B, D] embeddings of the first modality (normally L2-normalised).
        y: [B, D] embeddings of the second modality; ``y[i]`` matches ``x[i]``.
        logit_scale: scalar multiplier (the exponentiated temperature parameter).
        names: short names of the two modalities, used in metric keys.

    Returns:
        loss: scalar, mean of the x->y and y->x cross-entropies over the batch.
        metrics: {'loss', '<a>2<b>_acc', '<b>2<a>_acc', 'logit_scale'}.
    """
    x, y, logit_scale = check_pair(x, y, logit_scale)
    logits = logit_scale * (x @ y.T)  # [B, B]
    loss_xy = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=1)))
    loss_yx = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=0)))
    loss = 0.5 * (loss_xy + loss_yx)
    metrics = {'loss': loss, **_retrieval_metrics(logits, names), 'logit_scale': logit_scale}
    return loss, metrics


def sigmoid_contrastive_loss(x: jax.Array, y: jax.Array, logit_scale: jax.Array,
                             logit_bias: jax.Array | None = None,
                             names: tuple[str, str] = ('i', 't')) -> tuple[jax.Array, Metrics]:
    """Pairwise sigmoid loss (SigLIP).

    Args:
        x: [B, D] embeddings of the first modality.
        y: [B, D] embeddings of the second modality; ``y[i]`` matches ``x[i]``.
        logit_scale: scalar multiplier.
        logit_bias: scalar added to every logit; None means 0.
        names: short names of the two modalities, used in metric keys.

    Returns:
        loss: scalar, ``-sum_ij log_sigmoid(z_ij * logits_ij) / B`` with ``z = 2 * eye(B) - 1``.
        metrics: {'loss', '<a>2<b>_acc', '<b>2<a>_acc', 'logit_scale', 'logit_bias'}.
    """
    x, y, logit_scale = check_pair(x, y, logit_scale)
    if logit_bias is None:
        logit_bias = 0.0
    if jnp.ndim(logit_bias) != 0:
        raise ValueError(f'logit_bias must be a scalar; got shape {jnp.shape(logit_bias)}.')
    logit_bias = jnp.asarray(logit_bias, jnp.float32)
    batch = x.shape[0]
    logits = logit_scale * (x @ y.T) + logit_bias  # [B, B]
    labels = 2.0 * jnp.eye(batch, dtype=jnp.float32) - 1.0
    loss = -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / batch
    metrics = {'loss': loss, **_retrieval_metrics(logits, names), 'logit_scale': logit_scale,
               'logit_bias': logit_bias}
    return loss, metrics


LOSS_NAMES = ('softmax', 'sigmoid')


def pairwise_contrastive_loss(outputs: dict, a: str, b: str, loss_name: str) -> tuple[jax.Array, Metrics]:
    """Contrastive loss between modalities ``a`` and ``b`` of a model output dict.

    Args:
        outputs: {'embeddings': {modality: [B, D]}, 'logit_scale': scalar, optional 'logit_bias': scalar}.
        a, b: modality names, keys of ``outputs['embeddings']``.
        loss_name: 'softmax' or 'sigmoid'.
    """
    if loss_name not in LOSS_NAMES:
        raise ValueError(f'Unknown contrastive loss {loss_name!r}; expected one of {list(LOSS_NAMES)}.')
    embeddings = outputs['embeddings']
    for name in (a, b):
        if name not in embeddings:
            raise ValueError(f'Model outputs have no {name!r} embeddings; available: {sorted(embeddings)}.')
    names = (a[0], b[0])
    if loss_name == 'sigmoid':
        return sigmoid_contrastive_loss(embeddings[a], embeddings[b], outputs['logit_scale'],
                                        outputs.get('logit_bias'), names=names)
    return softmax_contrastive_loss(embeddings[a], embeddings[b], outputs['logit_scale'], names=names)


def contrastive_loss(outputs: dict, loss_name: str) -> tuple[jax.Array, Metrics]:
    """Image-text contrastive loss of a ``ContrastiveModel`` output dict.

    Args:
        outputs: {'embeddings': {'image': [B, D], 'text': [B, D]}, 'logit_scale': scalar, optional 'logit_bias'}.
        loss_name: 'softmax' (CLIP InfoNCE) or 'sigmoid' (SigLIP; uses ``logit_bias`` when present).

    Returns:
        (loss scalar float32, metrics dict with 'loss', 'i2t_acc', 't2i_acc', ...).
    """
    return pairwise_contrastive_loss(outputs, 'image', 'text', loss_name)


DEFAULT_PAIRS = (('image', 'text', 1.0),)


def multi_pair_contrastive_loss(outputs: dict, pairs, loss_name: str, pair_loss=None) -> tuple[jax.Array, Metrics]:
    """Weighted sum of pairwise contrastive losses over the modality pairs present in ``outputs``.

    Args:
        outputs: {'embeddings': {modality: [B, D]}, 'logit_scale': scalar (shared by every pair), ...}.
        pairs: ((a, b, weight), ...) (config ``model.pairs``); a pair whose a or b has no embeddings in
            ``outputs`` (the modality is missing from the batch) is skipped.
        loss_name: 'softmax' or 'sigmoid'.
        pair_loss: (outputs, a, b) -> (loss, metrics); default :func:`pairwise_contrastive_loss` with
            ``loss_name`` (the chunked ring loss plugs in here).

    Returns:
        loss = sum_pairs weight * loss(a, b); metrics: every pair's retrieval accuracies ('a2t_acc', ...),
        'loss/<a>_<b>' (the unweighted pair loss) per present pair, 'logit_scale', and 'loss' (the total).
        Raises ValueError when no pair is present.
    """
    if pair_loss is None:
        pair_loss = lambda out, a, b: pairwise_contrastive_loss(out, a, b, loss_name)  # noqa: E731
    present = set(outputs['embeddings'])
    total, metrics, used = jnp.zeros((), jnp.float32), {}, []
    for a, b, weight in pairs:
        if a not in present or b not in present:
            continue
        loss, pair_metrics = pair_loss(outputs, a, b)
        total = total + float(weight) * loss
        metrics.update({k: v for k, v in pair_metrics.items() if k != 'loss'})
        metrics[f'loss/{a}_{b}'] = loss
        used.append((a, b))
    if not used:
        raise ValueError(f'none of the modality pairs {[(a, b) for a, b, _ in pairs]} (config model.pairs) has both '
                         f'modalities in the batch, which has embeddings {sorted(present)}')
    metrics['loss'] = total
    return total, metrics
