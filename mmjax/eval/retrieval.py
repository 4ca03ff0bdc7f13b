"""Image-text retrieval: recall@k both ways, several captions per image, captions that describe only a class
counted as hits for every image of that class.

    retrieval_metrics(image_emb, text_emb, text_image, groups) -> {'retrieval/i2t/r1', ..., 'retrieval/t2i/r10'}
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mmjax.data import digits
from mmjax.eval.encoder import TowerEncoder, embed, require_fields

RETRIEVAL_KS = (1, 5, 10)


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


