"""Evaluators on constructed embeddings: retrieval, multi-caption hits, linear probe, zero-shot."""

import numpy as np
import pytest

from mmjax.eval import linear_probe as linear_probe_mod
from mmjax.eval import retrieval as retrieval_mod
from mmjax.eval import zeroshot as zeroshot_mod


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_identity_embeddings_retrieve_perfectly():
    n, k = 50, 3
    img = np.eye(n, dtype=np.float32)
    text_image = np.repeat(np.arange(n), k)
    txt = img[text_image]
    m = retrieval_mod.retrieval_metrics(img, txt, text_image)
    assert set(m) == {f"retrieval/{d}/r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    assert all(v == 1.0 for v in m.values()), m


def test_shuffled_embeddings_are_at_chance():
    n, k = 400, 2
    rng = np.random.default_rng(0)
    img = _unit(rng.normal(size=(n, 32)))
    text_image = np.repeat(np.arange(n), k)
    txt = img[rng.permutation(n)][text_image]  # each caption matches some other image
    m = retrieval_mod.retrieval_metrics(img, txt, text_image)
    assert m["retrieval/t2i/r1"] < 0.02 and m["retrieval/t2i/r10"] < 0.06  # chance 1/n, 10/n
    assert m["retrieval/i2t/r10"] < 0.1  # chance ~ k*10/n


def test_a_hit_on_any_caption_counts():
    img = np.eye(3, dtype=np.float32)
    # image 0 owns captions 0 and 1; caption 0 is nearest image 1, caption 1 image 0.
    text_image = np.array([0, 0, 1, 2])
    txt = np.array([[0, .8, 0], [1, 0, 0], [0, .9, .1], [0, .1, .9]], np.float32)
    m = retrieval_mod.retrieval_metrics(img, txt, text_image, ks=(1,))
    assert m["retrieval/i2t/r1"] == 1.0  # image 0's top caption is caption 1, its own
    assert m["retrieval/t2i/r1"] == 0.75  # caption 0 retrieves image 1
    # with groups: images 0 and 1 are interchangeable, so caption 0 -> image 1 is a hit
    m = retrieval_mod.retrieval_metrics(img, txt, text_image, image_groups=np.array([0, 0, 1]), ks=(1,))
    assert m["retrieval/t2i/r1"] == 1.0


def test_digits_caption_set_is_fixed_and_multi_caption():
    labels = np.array([3, 7, 3])
    caps, owners = retrieval_mod.digits_caption_set(labels, 4, seed=0)
    assert len(caps) == 12 and list(owners) == [0] * 4 + [1] * 4 + [2] * 4
    assert len(set(caps[:4])) == 4
    assert all("3" in c or "three" in c for c in caps[:4])
    assert retrieval_mod.digits_caption_set(labels, 4, seed=0) [0] == caps


def test_linear_probe_separable_features():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(5, 8)) * 5
    y_tr, y_te = rng.integers(0, 5, 300), rng.integers(0, 5, 100)
    x_tr = centers[y_tr] + rng.normal(size=(300, 8)) * 0.3
    x_te = centers[y_te] + rng.normal(size=(100, 8)) * 0.3
    m, info = linear_probe_mod.linear_probe(x_tr, y_tr, x_te, y_te)
    assert m["linear_probe/top1"] == 1.0
    assert info["l2"] in linear_probe_mod.L2_GRID


def test_zeroshot_on_constructed_embeddings():
    rng = np.random.default_rng(1)
    classes = _unit(rng.normal(size=(10, 16)))
    labels = rng.integers(0, 10, 200)
    img = _unit(classes[labels] + 0.05 * rng.normal(size=(200, 16)))
    per_template = np.stack([classes + 0.01 * rng.normal(size=classes.shape) for _ in range(3)], 1)
    m, pred = zeroshot_mod.zeroshot_metrics(img, per_template, labels)
    assert m["zeroshot/top1"] == 1.0 and m["zeroshot/top5"] == 1.0
    np.testing.assert_array_equal(pred, labels)
    wrong = np.roll(classes, 1, axis=0)  # class c's embedding now sits at row c+1
    m, _ = zeroshot_mod.zeroshot_metrics(img, wrong, labels)
    assert m["zeroshot/top1"] == 0.0


@pytest.mark.parametrize("call,field", [
    (lambda: zeroshot_mod.zeroshot(None, None, {"image": np.zeros((2, 4, 4, 1))}, ["a"], ["{}"]), "label"),
    (lambda: retrieval_mod.retrieval(None, None, {"image": np.zeros((2, 4, 4, 1)), "captions": ["x"]}), "text_image"),
    (lambda: linear_probe_mod.linear_probe_eval(None, {"label": np.zeros(2)}, {}), "image"),
])
def test_missing_field_is_named(call, field):
    with pytest.raises(ValueError, match=f"'{field}'"):
        call()
