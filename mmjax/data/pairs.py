"""Image-caption matching pairs (task 'classification'): "does this caption describe this image?".

Each example of the global stream (pipeline.global_stream, so the same order, shuffling, augmentation and
topology independence as the contrastive stream) is (image, caption, label): with probability 0.5 the caption
describes the image's digit (label 1), otherwise another digit drawn uniformly from the other nine (label 0).
All draws use the example's own RNG (keyed by config.seed and its global stream position).

Held-out pairs (`load_eval_pairs`) are built from the test split (index % 5 == 0) with a fixed seed, so every
run is scored on the same pairs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from mmjax.data import pipeline
from mmjax.data.image import preprocess_images, random_affine
from mmjax.data.tokenizers import get_tokenizer

EVAL_SEED = 12345
MATCH_PROB = 0.5


def pair_caption(caption_fn, digit: int, num_classes: int, rng: np.random.Generator) -> tuple[str, int]:
    """(caption, label): a caption of `digit` (label 1) with probability MATCH_PROB, else of another class
    drawn uniformly (label 0)."""
    match = rng.random() < MATCH_PROB
    shown = digit if match else (digit + int(rng.integers(1, num_classes))) % num_classes
    return caption_fn(shown, rng), int(match)


@dataclasses.dataclass(frozen=True)
class PairAugmentTokenize(pipeline.CaptionAugmentTokenize):
    """Like CaptionAugmentTokenize, but the caption matches the image only half of the time.

    Output: {'image': float32 [image_size, image_size, channels], 'text': int32 [max_len],
    'label': int32 (1 = the caption describes the image), 'digit': int32 (the image's class)}.
    """

    num_classes: int = 10

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        digit = int(element['label'])
        caption, match = pair_caption(self.caption_fn, digit, self.num_classes, rng)
        text = self.tokenizer.encode([caption])[0]
        image = element['image']
        if self.augment:
            image = random_affine(image, rng)
        image = preprocess_images(image[None], self.image_size, self.channels, self.mean, self.std)[0]
        return {'image': image, 'text': text, 'label': np.int32(match), 'digit': np.int32(digit)}


def make_transform(config, **kwargs) -> PairAugmentTokenize:
    """The pair transform for `config` (kwargs: the CaptionAugmentTokenize fields pipeline computed)."""
    return PairAugmentTokenize(num_classes=len(pipeline._dataset(config).CLASS_NAMES), **kwargs)


def load_eval_pairs(config, split: str = 'test', seed: int = EVAL_SEED) -> dict[str, np.ndarray]:
    """Held-out pairs: every image of `split` (sorted by index, no augmentation) with one caption drawn with
    `seed` (independent of config.seed).

    Returns {'image': float32 [N,H,W,C], 'text': int32 [N,L], 'label': int32 [N] (1 = match),
    'digit': int32 [N]}.
    """
    evaluation = pipeline.load_eval_split(config, split)
    dataset = pipeline._dataset(config)
    rng = np.random.default_rng(seed)
    captions, labels = [], []
    for digit in evaluation['label']:
        caption, match = pair_caption(dataset.caption, int(digit), len(dataset.CLASS_NAMES), rng)
        captions.append(caption)
        labels.append(match)
    text = get_tokenizer(config.model.text).encode(captions)
    return {'image': evaluation['image'], 'text': np.asarray(text, np.int32),
            'label': np.asarray(labels, np.int32), 'digit': evaluation['label']}
