"""Evaluators of a trained model: zero-shot classification, image-text retrieval, linear probe.

Each evaluator has a part that works on embeddings (numpy, testable without a model) and a part that
embeds a dataset with a `TowerEncoder` (progress bar over evaluation batches). Datasets are dicts of
numpy arrays (as `mmjax.data.pipeline.load_eval_split` returns); an evaluator given a dataset without a
field it needs raises a ValueError naming the field.

    zeroshot_metrics(image_emb, class_emb, labels)              -> {'zeroshot/top1', 'zeroshot/top5'}, preds
    retrieval_metrics(image_emb, text_emb, text_image, groups)  -> {'retrieval/i2t/r1', ..., 'retrieval/t2i/r10'}
    linear_probe(train_x, train_y, test_x, test_y)              -> {'linear_probe/top1'}, info
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmjax.evaluate import TowerEncoder, topk_accuracy, zeroshot_weights

RETRIEVAL_KS = (1, 5, 10)
L2_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def require_fields(data: dict, fields: Sequence[str], evaluator: str) -> None:
    """Raises ValueError naming the first of `fields` that `data` lacks."""
    for f in fields:
        if f not in data:
            raise ValueError(f"the {evaluator} evaluator needs a {f!r} field in its dataset, which has "
                             f"only {sorted(data)}")


def embed(encoder: TowerEncoder, method: str, inputs: np.ndarray, desc: str = "",
          progress: bool = False) -> np.ndarray:
    """encoder.encode(method, inputs) one encoder batch at a time, with a tqdm bar when `progress`."""
    bs = encoder.batch_size
    starts = range(0, len(inputs), bs)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="batch", leave=False)
    out = [encoder.encode(method, inputs[s:s + bs]) for s in starts]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


# ----------------------------------------------------------------------------------------- zero-shot

def zeroshot_metrics(image_emb: np.ndarray, class_emb: np.ndarray, labels: np.ndarray):
    """image_emb [N, D]; class_emb [C, D] (or [C, T, D]: per-template embeddings, averaged per class and
    re-normalised); labels [N]. Returns ({'zeroshot/top1', 'zeroshot/top5' (if C > 5)}, predictions [N])."""
    w = np.asarray(class_emb, np.float32)
    if w.ndim == 3:
        w = w.mean(axis=1)
        w = w / np.linalg.norm(w, axis=-1, keepdims=True)
    logits = np.asarray(image_emb, np.float32) @ w.T
    labels = np.asarray(labels)
    result = {"zeroshot/top1": topk_accuracy(logits, labels, 1)}
    if w.shape[0] > 5:
        result["zeroshot/top5"] = topk_accuracy(logits, labels, 5)
    return result, np.argmax(logits, axis=-1)


def zeroshot(encoder: TowerEncoder, tokenizer, data: dict, class_names: Sequence[str],
             templates: Sequence[str], progress: bool = False):
    """Zero-shot classification of data['image'] (preprocessed) against class_names x templates.
    Same numbers as `mmjax.evaluate.zeroshot_eval`. Returns (metrics, predictions)."""
    require_fields(data, ("image", "label"), "zero-shot")
    w = zeroshot_weights(encoder, tokenizer, class_names, templates)
    image_emb = embed(encoder, "encode_image", data["image"], "zero-shot images", progress)
    return zeroshot_metrics(image_emb, w, data["label"])


# ----------------------------------------------------------------------------------------- retrieval

def _topk(scores: np.ndarray, k: int) -> np.ndarray:
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return part


def retrieval_metrics(image_emb: np.ndarray, text_emb: np.ndarray, text_image: np.ndarray,
                      image_groups: np.ndarray | None = None, ks: Sequence[int] = RETRIEVAL_KS):
    """Recall@k both ways over N images and M captions, several captions per image.

    text_image [M]: the image (row of image_emb) caption m describes. A caption is relevant to its own
    image, and, when `image_groups` [N] is given, to every image of the same group (for captions that
    describe only a class, like the digits', images of one class are interchangeable).
    image->text R@k: fraction of images with ANY relevant caption among their k nearest captions.
    text->image R@k: fraction of captions with a relevant image among their k nearest images.
    """
    image_emb = np.asarray(image_emb, np.float32)
    text_emb = np.asarray(text_emb, np.float32)
    text_image = np.asarray(text_image)
    n = len(image_emb)
    if len(text_image) != len(text_emb):
        raise ValueError(f"text_image has {len(text_image)} entries for {len(text_emb)} captions")
    if len(text_image) and (text_image.min() < 0 or text_image.max() >= n):
        raise ValueError(f"text_image refers to images outside [0, {n})")
    groups = np.arange(n) if image_groups is None else np.asarray(image_groups)
    relevant = groups[:, None] == groups[text_image][None, :]  # [N, M]
    scores = image_emb @ text_emb.T
    result = {}
    for k in ks:
        top_t = _topk(scores, k)  # [N, k]
        result[f"retrieval/i2t/r{k}"] = float(np.mean(np.take_along_axis(relevant, top_t, 1).any(1)))
    for k in ks:
        top_i = _topk(scores.T, k)  # [M, k]
        result[f"retrieval/t2i/r{k}"] = float(np.mean(np.take_along_axis(relevant.T, top_i, 1).any(1)))
    return result


def digits_caption_set(labels: np.ndarray, captions_per_image: int = 5, seed: int = 0):
    """An image-caption eval set for the digits: for each image, `captions_per_image` distinct training
    caption templates (drawn with a fixed seed) filled with its label.

    Returns (captions: list[str] of length N * K, text_image: int [N * K])."""
    from mmjax.data import digits

    rng = np.random.default_rng(seed)
    templates = digits.CAPTION_TEMPLATES
    k = min(captions_per_image, len(templates))
    captions, owners = [], []
    for i, label in enumerate(np.asarray(labels)):
        for t in rng.choice(len(templates), size=k, replace=False):
            captions.append(templates[t].format(word=digits.CLASS_NAMES[int(label)], digit=str(int(label))))
            owners.append(i)
    return captions, np.asarray(owners, np.int32)


def retrieval(encoder: TowerEncoder, tokenizer, data: dict, progress: bool = False):
    """Retrieval on data {'image' [N,...], 'captions' list[str] [M], 'text_image' int [M], optional
    'image_group' [N]} (see `retrieval_metrics`; with groups, duplicate captions within a group are
    counted once). Returns (metrics, (image_emb, text_emb))."""
    require_fields(data, ("image", "captions", "text_image"), "retrieval")
    captions, owners = list(data["captions"]), np.asarray(data["text_image"])
    groups = data.get("image_group")
    if groups is not None:  # identical captions of one group are one caption (else R@5 = 5 copies of it)
        first = {}
        for m, (c, o) in enumerate(zip(captions, owners)):
            first.setdefault((c, int(np.asarray(groups)[o])), m)
        keep = sorted(first.values())
        captions, owners = [captions[m] for m in keep], owners[keep]
    image_emb = embed(encoder, "encode_image", data["image"], "retrieval images", progress)
    text_emb = embed(encoder, "encode_text", tokenizer.encode(captions), "retrieval captions", progress)
    metrics = retrieval_metrics(image_emb, text_emb, owners, groups)
    return metrics, (image_emb, text_emb)


# ----------------------------------------------------------------------------------------- linear probe

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
