"""Held-out image-caption matching pairs: "does this caption describe this image?".

Each training example of the pairs stream (pipeline.global_stream with examples='pairs', so the same order, shuffling, augmentation and
topology independence as the contrastive stream) is (image, caption, label): with probability 0.5 the caption
describes the image's digit (label 1), otherwise another digit drawn uniformly from the other nine (label 0).
All draws use the example's own RNG (keyed by config.seed and its global stream position).

Held-out pairs (`load_eval_pairs`) are built from the test split (index % 5 == 0) with a fixed seed, so every
run is scored on the same pairs.
"""

from __future__ import annotations

import numpy as np

from mmjax.data import pipeline
from mmjax.data.pipeline import pair_caption
from mmjax.data.tokenizers import get_tokenizer

EVAL_SEED = 12345


def load_eval_pairs(config, split: str = 'test', seed: int = EVAL_SEED) -> dict[str, np.ndarray]:
    """Held-out pairs: every image of `split` (sorted by index, no augmentation) with one caption drawn with
    `seed` (independent of config.seed).

    Returns {'image': float32 [N,H,W,C], 'text': int32 [N,L], 'label': int32 [N] (1 = match),
    'digit': int32 [N]}.
    """
    evaluation = pipeline.load_eval_split(config, split)
    dataset = pipeline.labelled_dataset(config)
    rng = np.random.default_rng(seed)
    captions, labels = [], []
    for digit in evaluation['label']:
        caption, match = pair_caption(dataset.caption, int(digit), len(dataset.CLASS_NAMES), rng)
        captions.append(caption)
        labels.append(match)
    text = get_tokenizer(config.model.text).encode(captions)
    return {'image': evaluation['image'], 'text': np.asarray(text, np.int32),
            'label': np.asarray(labels, np.int32), 'digit': evaluation['label']}
