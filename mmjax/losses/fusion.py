"""Objectives beyond contrastive: image-text matching (ITM), masked language modelling (MLM), classification.

Like `losses.py`, everything is plain ``jnp`` over the global batch in float32 and every loss returns
``(loss scalar, metrics dict)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.losses import contrastive as losses

Metrics = dict[str, jax.Array]
SPECIAL_IDS = (0, 1, 2)  # pad, BOS (=CLS), EOT of the byte tokenizer


# --------------------------------------------------------------------------------------------- ITM

def itm_loss(logits_pos: jax.Array, logits_neg: jax.Array) -> tuple[jax.Array, Metrics]:
    """Binary cross-entropy of ITM logits: positives labelled 1, negatives 0, mean over all N + M examples.

    Args:
        logits_pos: [N] logits of matching pairs.
        logits_neg: [M] logits of non-matching pairs.

    Returns:
        loss, {'itm_loss', 'itm_acc' (logit > 0 on positives, < 0 on negatives)}.
    """
    pos, neg = jnp.ravel(logits_pos).astype(jnp.float32), jnp.ravel(logits_neg).astype(jnp.float32)
    nll = jnp.concatenate([-jax.nn.log_sigmoid(pos), -jax.nn.log_sigmoid(-neg)])
    correct = jnp.concatenate([pos > 0, neg < 0])
    loss = jnp.mean(nll)
    return loss, {'itm_loss': loss, 'itm_acc': jnp.mean(correct.astype(jnp.float32))}


# --------------------------------------------------------------------------------------------- MLM

def mask_tokens(tokens: jax.Array, rng: jax.Array, mask_prob: float, mask_id: int, vocab_size: int,
                special_ids: Sequence[int] = SPECIAL_IDS, replace_probs: tuple[float, float] = (0.8, 0.1)
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """BERT-style masking.

    Each token not in `special_ids` (pad/BOS/EOT are never touched) is selected with probability `mask_prob`;
    a selected token becomes `mask_id` with probability replace_probs[0], a random id (uniform over
    [0, vocab_size) minus special ids and mask_id) with probability replace_probs[1], else stays.

    Args:
        tokens: int [B, L].
        rng: PRNG key.
        mask_prob, mask_id, vocab_size, special_ids, replace_probs: as above; mask_id < vocab_size.

    Returns:
        masked_tokens int32 [B, L]; targets int32 [B, L] (the original token where selected, pad 0 elsewhere);
        weights float32 [B, L] (1 where selected, else 0).
    """
    special_ids = tuple(int(s) for s in special_ids)
    if not 0.0 <= mask_prob <= 1.0:
        raise ValueError(f'mask_prob must be in [0, 1]; got {mask_prob}')
    if not 0 <= mask_id < vocab_size or mask_id in special_ids:
        raise ValueError(f'mask_id {mask_id} must be in [0, vocab_size={vocab_size}) and not a special id '
                         f'{special_ids}')
    p_mask, p_random = replace_probs
    if p_mask < 0 or p_random < 0 or p_mask + p_random > 1:
        raise ValueError(f'replace_probs must be non-negative and sum to <= 1; got {replace_probs}')
    allowed = np.setdiff1d(np.arange(vocab_size), np.asarray(special_ids + (mask_id,)))
    if allowed.size == 0:
        raise ValueError(f'no ids left for random replacement in vocab_size {vocab_size}')
    tokens = jnp.asarray(tokens).astype(jnp.int32)
    r_select, r_kind, r_random = jax.random.split(rng, 3)
    eligible = ~jnp.isin(tokens, jnp.asarray(special_ids, jnp.int32))
    selected = eligible & (jax.random.uniform(r_select, tokens.shape) < mask_prob)
    kind = jax.random.uniform(r_kind, tokens.shape)
    random_ids = jnp.asarray(allowed, jnp.int32)[jax.random.randint(r_random, tokens.shape, 0, allowed.size)]
    replaced = jnp.where(kind < p_mask, mask_id, jnp.where(kind < p_mask + p_random, random_ids, tokens))
    masked = jnp.where(selected, replaced, tokens).astype(jnp.int32)
    targets = jnp.where(selected, tokens, 0).astype(jnp.int32)
    return masked, targets, selected.astype(jnp.float32)


def mlm_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> tuple[jax.Array, Metrics]:
    """Cross-entropy over masked positions only.

    Args:
        logits: [B, L, V]; targets: int [B, L]; weights: [B, L] (0 = not scored; such positions' logits do not
            affect the loss at all, even if non-finite).

    Returns:
        loss = sum(w * CE) / sum(w) (0 when nothing is masked), {'mlm_loss', 'mlm_acc', 'mlm_count'}.
    """
    if logits.shape[:-1] != targets.shape or targets.shape != weights.shape:
        raise ValueError(f'mlm_loss expects logits [B,L,V], targets [B,L], weights [B,L]; got {logits.shape}, '
                         f'{targets.shape}, {weights.shape}')
    weights = weights.astype(jnp.float32)
    scored = weights > 0
    logits = jnp.where(scored[..., None], logits.astype(jnp.float32), 0.0)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None].astype(jnp.int32),
                               axis=-1)[..., 0]
    count = jnp.sum(weights)
    denom = jnp.where(count > 0, count, 1.0)
    loss = jnp.sum(jnp.where(scored, weights * nll, 0.0)) / denom
    correct = jnp.where(scored, weights * (jnp.argmax(logits, axis=-1) == targets), 0.0)
    return loss, {'mlm_loss': loss, 'mlm_acc': jnp.sum(correct) / denom, 'mlm_count': count}


# --------------------------------------------------------------------------------------------- classification

def classification_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, Metrics]:
    """Softmax cross-entropy. logits [B, C], labels int [B] -> loss (mean), {'loss', 'accuracy'}."""
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f'classification_loss expects logits [B,C] and labels [B]; got {logits.shape}, '
                         f'{labels.shape}')
    logits = logits.astype(jnp.float32)
    labels = labels.astype(jnp.int32)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), labels[:, None], axis=-1)[:, 0]
    loss = jnp.mean(nll)
    accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
    return loss, {'loss': loss, 'accuracy': accuracy}


def matched_contrastive_loss(x: jax.Array, y: jax.Array, logit_scale: jax.Array,
                             matched: jax.Array) -> tuple[jax.Array, Metrics]:
    """Symmetric InfoNCE (CLIP) over the matching pairs of a batch of image-caption pairs only.

    Args:
        x, y: [B, D] embeddings (normally unit-norm); (x[i], y[i]) is a positive pair where `matched[i]`.
        logit_scale: scalar multiplier (the exponentiated temperature).
        matched: bool/int [B]; rows and columns of non-matching pairs take no part (their captions describe
            another image, so they are neither positives nor used as negatives).

    Returns:
        loss = mean over matched i of 0.5 * (CE of row i over matched columns + CE of column i over matched rows)
        (0 when nothing matches), {'contrastive_loss', 'i2t_acc', 't2i_acc' (top-1 among the matched pairs)}.
    """
    if x.ndim != 2 or x.shape != y.shape or matched.shape != x.shape[:1]:
        raise ValueError(f'matched_contrastive_loss expects x, y [B,D] and matched [B]; got {x.shape}, {y.shape}, '
                         f'{matched.shape}')
    valid = matched.astype(bool)
    pair = valid[:, None] & valid[None, :]
    logits = jnp.asarray(logit_scale, jnp.float32) * (x.astype(jnp.float32) @ y.astype(jnp.float32).T)
    logits = jnp.where(pair, logits, -1e9)  # finite, so invalid rows give no NaN
    diag = jnp.arange(x.shape[0])
    loss_xy = -jnp.diagonal(jax.nn.log_softmax(logits, axis=1))
    loss_yx = -jnp.diagonal(jax.nn.log_softmax(logits, axis=0))
    weights = valid.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(weights), 1.0)
    loss = jnp.sum(weights * 0.5 * (loss_xy + loss_yx)) / count
    i2t = jnp.sum(weights * (jnp.argmax(logits, axis=1) == diag)) / count
    t2i = jnp.sum(weights * (jnp.argmax(logits, axis=0) == diag)) / count
    return loss, {'contrastive_loss': loss, 'i2t_acc': i2t, 't2i_acc': t2i}


def classification_contrastive_loss(outputs: dict, labels: jax.Array,
                                    contrastive_weight: float) -> tuple[jax.Array, Metrics]:
    """CE + contrastive_weight * matched_contrastive_loss for a FusionClassifier called with_embeddings=True.

    Args:
        outputs: {'logits' [B,C], 'embeddings': {'image', 'text': [B,D]}, 'logit_scale' []}.
        labels: int [B], 1 = the caption matches the image (those pairs are the contrastive positives).

    Returns:
        total, {'loss' (total), 'ce_loss', 'accuracy', 'contrastive_loss', 'i2t_acc', 't2i_acc', 'logit_scale'}.
    """
    ce, metrics = classification_loss(outputs['logits'], labels)
    emb = outputs['embeddings']
    c_loss, c_metrics = matched_contrastive_loss(emb['image'], emb['text'], outputs['logit_scale'], labels == 1)
    total = ce + contrastive_weight * c_loss
    return total, {**c_metrics, 'ce_loss': ce, 'accuracy': metrics['accuracy'], 'loss': total,
                   'logit_scale': jnp.asarray(outputs['logit_scale'], jnp.float32)}


# --------------------------------------------------------------------------------------------- combined

def add_mlm_inputs(batch: dict[str, jax.Array], rng: jax.Array, mask_prob: float, mask_id: int,
                   vocab_size: int, special_ids: Sequence[int] = SPECIAL_IDS) -> dict[str, jax.Array]:
    """batch with 'text' -> the batch plus 'mlm_text', 'mlm_targets', 'mlm_weights' (see mask_tokens)."""
    masked, targets, weights = mask_tokens(batch['text'], rng, mask_prob, mask_id, vocab_size, special_ids)
    return dict(batch, mlm_text=masked, mlm_targets=targets, mlm_weights=weights)


def itm_mlm_loss(outputs: dict, batch: dict[str, jax.Array], loss_name: str, itm_weight: float = 1.0,
                 mlm_weight: float = 1.0) -> tuple[jax.Array, Metrics]:
    """contrastive + itm_weight * ITM + mlm_weight * MLM for a ContrastiveItmMlmModel.

    Args:
        outputs: model outputs with 'embeddings', 'logit_scale', 'itm_logits_pos', 'itm_logits_neg', 'mlm_logits'.
        batch: with 'mlm_targets' and 'mlm_weights' (from add_mlm_inputs).
        loss_name: contrastive loss, 'softmax' or 'sigmoid'.

    Returns:
        total loss, metrics: the contrastive metrics ('contrastive_loss' for its loss) plus ITM and MLM metrics and
        'loss' (the total).
    """
    c_loss, metrics = losses.contrastive_loss(outputs, loss_name)
    i_loss, i_metrics = itm_loss(outputs['itm_logits_pos'], outputs['itm_logits_neg'])
    m_loss, m_metrics = mlm_loss(outputs['mlm_logits'], batch['mlm_targets'], batch['mlm_weights'])
    total = c_loss + itm_weight * i_loss + mlm_weight * m_loss
    metrics = {**{k: v for k, v in metrics.items() if k != 'loss'}, 'contrastive_loss': c_loss,
               **i_metrics, **m_metrics, 'loss': total}
    return total, metrics
