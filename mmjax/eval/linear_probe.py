"""Linear probe: multinomial logistic regression on frozen image features, its L2 strength chosen on a held-out
part of the train split.

    linear_probe(train_x, train_y, test_x, test_y) -> {'linear_probe/top1'}, info
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmjax.eval.encoder import TowerEncoder, embed, require_fields

L2_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def _fit_logreg(x, y, weight, l2, num_classes: int, iters: int):
    """Multinomial logistic regression (weights + bias, L2 on weights) by L-BFGS on the rows with
    weight 1 (a 0/1 mask, so every fit of one probe has the same shapes: one compile). Returns (W, b)."""
    d = x.shape[1]
    onehot = jax.nn.one_hot(y, num_classes)

    def loss(p):
        logits = x @ p["w"] + p["b"]
        nll = -jnp.sum(onehot * jax.nn.log_softmax(logits), -1)
        return jnp.sum(weight * nll) / jnp.sum(weight) + 0.5 * l2 * jnp.sum(p["w"] ** 2)

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)
    params = {"w": jnp.zeros((d, num_classes), jnp.float32), "b": jnp.zeros((num_classes,), jnp.float32)}

    def body(_, carry):
        p, state = carry
        value, grad = value_and_grad(p, state=state)
        updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=loss)
        return optax.apply_updates(p, updates), state

    params, _ = jax.lax.fori_loop(0, iters, body, (params, opt.init(params)))
    return params["w"], params["b"]


_fit_logreg_jit = jax.jit(_fit_logreg, static_argnums=(4, 5))


def _standardise(x, fit_rows, *others):
    mu, sd = x[fit_rows].mean(0), x[fit_rows].std(0) + 1e-6
    return [(a - mu) / sd for a in (x, *others)]


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 l2_grid: Sequence[float] = L2_GRID, val_fraction: float = 0.2, seed: int = 0,
                 iters: int = 200):
    """Frozen-feature linear probe: L2 strength chosen on a validation split carved (fixed seed) from
    the training features, then refitted on all of them; reports top-1 on the test features.
    Features are standardised with the statistics of the rows being fitted.

    Returns ({'linear_probe/top1': float}, {'l2': chosen, 'val_top1': {l2: acc}})."""
    train_x, train_y = np.asarray(train_x, np.float32), np.asarray(train_y, np.int32)
    test_x, test_y = np.asarray(test_x, np.float32), np.asarray(test_y, np.int32)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    perm = np.random.default_rng(seed).permutation(len(train_x))
    n_val = max(1, int(round(val_fraction * len(train_x))))
    val_idx = perm[:n_val]
    fit_mask = np.ones(len(train_x), np.float32)
    fit_mask[val_idx] = 0.0
    (sx,) = _standardise(train_x, fit_mask > 0)
    y = jnp.asarray(train_y)
    val_acc = {}
    for l2 in l2_grid:
        w, b = _fit_logreg_jit(jnp.asarray(sx), y, jnp.asarray(fit_mask), jnp.float32(l2), num_classes, iters)
        pred = np.argmax(sx[val_idx] @ np.asarray(w) + np.asarray(b), -1)
        val_acc[float(l2)] = float(np.mean(pred == train_y[val_idx]))
    best = max(val_acc, key=lambda l2: (val_acc[l2], l2))  # ties -> stronger regularisation
    ax, tx = _standardise(train_x, slice(None), test_x)
    w, b = _fit_logreg_jit(jnp.asarray(ax), y, jnp.ones(len(train_x), jnp.float32), jnp.float32(best),
                           num_classes, iters)
    pred = np.argmax(tx @ np.asarray(w) + np.asarray(b), -1)
    return {"linear_probe/top1": float(np.mean(pred == test_y))}, {"l2": best, "val_top1": val_acc}


def linear_probe_eval(encoder: TowerEncoder, train: dict, test: dict, progress: bool = False):
    """Linear probe on frozen image features of `train` / `test` ({'image', 'label'} each)."""
    require_fields(train, ("image", "label"), "linear-probe (train split)")
    require_fields(test, ("image", "label"), "linear-probe (test split)")
    tr = embed(encoder, "encode_image", train["image"], "probe train images", progress)
    te = embed(encoder, "encode_image", test["image"], "probe test images", progress)
    return linear_probe(tr, train["label"], te, test["label"])
