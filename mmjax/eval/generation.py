"""Honest measurements of an image generator, on numpy, independent of any model.

Prompt accuracy alone is weak evidence (on 8x8 digits a sampler drawing each code position independently per
class already scores about 0.95), so a generator is judged on all of:
  - `PixelClassifier`: an independent classifier (logistic regression on pixels) trained on real training images;
    its accuracy on real held-out images is reported next to its accuracy on the generated ones;
  - `discriminator_accuracy`: a classifier told to separate real held-out images from generated ones,
    cross-validated; the best of a logistic regression and an MLP on pixels (0.5: indistinguishable);
  - `baseline_bits_per_token`: the held-out bits per token of the per-position-per-class code frequencies, the
    baseline a conditional likelihood must beat;
  - `uniqueness`: distinct samples per prompt and copies of training images, compared as code grids (what the
    generator produces; two samples with equal codes decode to equal images).
"""

from __future__ import annotations

import warnings

import numpy as np

SMOOTHING = (0.01, 0.03, 0.1, 0.3, 1.0)  # add-alpha values the baseline may pick from (its best is reported)


def _flat(images: np.ndarray) -> np.ndarray:
    return np.asarray(images, np.float32).reshape(len(images), -1)


class PixelClassifier:
    """Multinomial logistic regression on flattened pixel values [0, 1]: fit(images [N,H,W,C], labels [N]),
    predict(images) -> int [N], accuracy(images, labels) -> float."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, c: float = 1.0, seed: int = 0):
        from sklearn.linear_model import LogisticRegression  # optional heavy dependency, only for evaluation
        self.model = LogisticRegression(C=c, max_iter=2000, random_state=seed)
        self.model.fit(_flat(images), np.asarray(labels))

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.model.predict(_flat(images))

    def accuracy(self, images: np.ndarray, labels: np.ndarray) -> float:
        return float(np.mean(self.predict(images) == np.asarray(labels)))


def discriminator_accuracy(real: np.ndarray, generated: np.ndarray, folds: int = 5, seed: int = 0) -> float:
    """Real [N,...] vs generated [M,...] pixel images -> the k-fold cross-validated accuracy of the better of a
    logistic regression and a one-hidden-layer MLP telling them apart, on a balanced set (min(N, M) of each,
    drawn with `seed`). 0.5 means indistinguishable to these classifiers; 1.0 perfectly separated."""
    from sklearn.linear_model import LogisticRegression  # optional heavy dependency, only for evaluation
    from sklearn.model_selection import StratifiedKFold, cross_val_score  # optional heavy dependency
    from sklearn.neural_network import MLPClassifier  # optional heavy dependency
    rng = np.random.default_rng(seed)
    n = min(len(real), len(generated))
    x = np.concatenate([_flat(real)[rng.permutation(len(real))[:n]],
                        _flat(generated)[rng.permutation(len(generated))[:n]]])
    y = np.concatenate([np.zeros(n, np.int32), np.ones(n, np.int32)])
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    models = (LogisticRegression(max_iter=2000), MLPClassifier((64,), max_iter=500, random_state=seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the MLP's "not converged yet": its score is what it is
        return float(max(np.mean(cross_val_score(m, x, y, cv=cv)) for m in models))


def code_frequencies(codes: np.ndarray, labels: np.ndarray, vocab: int, num_classes: int) -> np.ndarray:
    """codes int [N,P] (P positions), labels int [N] -> counts float64 [num_classes, P, vocab]."""
    codes, labels = np.asarray(codes).reshape(len(codes), -1), np.asarray(labels)
    counts = np.zeros((num_classes, codes.shape[1], vocab))
    np.add.at(counts, (labels[:, None], np.arange(codes.shape[1])[None], codes), 1.0)
    return counts


def baseline_bits_per_token(train_codes: np.ndarray, train_labels: np.ndarray, test_codes: np.ndarray,
                            test_labels: np.ndarray, vocab: int, num_classes: int) -> float:
    """Held-out bits per code of the per-position-per-class model p(code | position, class) = add-alpha smoothed
    training frequencies; alpha is the best of `SMOOTHING` on the held-out codes themselves (a baseline at least
    as strong as any fixed choice). codes int [N,P], labels int [N]."""
    counts = code_frequencies(train_codes, train_labels, vocab, num_classes)
    test_codes = np.asarray(test_codes).reshape(len(test_codes), -1)
    index = (np.asarray(test_labels)[:, None], np.arange(test_codes.shape[1])[None], test_codes)
    best = np.inf
    for alpha in SMOOTHING:
        probs = (counts + alpha) / (counts.sum(-1, keepdims=True) + alpha * vocab)
        best = min(best, float(-np.mean(np.log2(probs[index]))))
    return best


def uniqueness(samples: np.ndarray, training: np.ndarray) -> dict[str, float]:
    """samples int [P,n,...] (n code grids per prompt), training int [M,...] -> {'distinct_fraction': the share of
    distinct samples within each prompt's n, averaged; 'training_copies': the share of samples equal to a
    training grid; 'unique_fraction': the share that are both new within their prompt and no training copy}."""
    samples = np.asarray(samples)
    prompts, n = samples.shape[:2]
    seen_train = {row.tobytes() for row in np.asarray(training, samples.dtype).reshape(len(training), -1)}
    distinct, copies, novel = 0, 0, 0
    for p in range(prompts):
        seen: set[bytes] = set()
        for row in samples[p].reshape(n, -1):
            key = row.tobytes()
            is_copy = key in seen_train
            copies += is_copy
            novel += (key not in seen) and not is_copy
            seen.add(key)
        distinct += len(seen)
    total = prompts * n
    return {'distinct_fraction': distinct / total, 'training_copies': copies / total, 'unique_fraction': novel / total}


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Pixel values [0, 1] -> uint8 (rounded, clipped)."""
    return np.clip(np.rint(np.asarray(pixels, np.float32) * 255.0), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, pad: int = 1) -> np.ndarray:
    """images uint8 [R,C,H,W,Ch] -> one uint8 grid [R*(H+pad)+pad, C*(W+pad)+pad, Ch] (black borders)."""
    rows, cols, h, w, ch = images.shape
    grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, ch), np.uint8)
    for r in range(rows):
        for c in range(cols):
            top, left = pad + r * (h + pad), pad + c * (w + pad)
            grid[top:top + h, left:left + w] = images[r, c]
    return grid
