"""Descriptive captions of the embedded digits, from each image's own pixels (the 'described' examples of the
training stream, and the references of captioning evaluation).

A caption names the digit and two attributes measured on the 32x32 image (ink bright on black), each relative
to the median of the digit's own class over the training split (index % 5 != 0), so every attribute splits
every class about in half:
  - stroke 'thick' / 'thin': ink mass (the mean pixel value);
  - slant 'leaning right' / 'leaning left': -mu11 / mu02 of the ink (image moments; rows grow downwards, so a
    positive value means the top leans right).
Each image has one reference per template (`references`); training draws one template per example (`caption`).
Without the attributes only the digit word would carry weight in CIDEr; with them a captioner must read the
pixels to score well, and the most frequent caption scores low.
"""

from __future__ import annotations

import functools
import itertools
import re
from typing import NamedTuple

import numpy as np

from mmjax.data import digits

# Every template names the digit and both attributes, in the same order and at the same word positions, around
# fixed words of its own: a correct caption then scores the same CIDEr-D whatever its template (the fixed words
# occur in every image's references, so their tf-idf weight is 0, and each template's boundary n-grams such as
# 'this thick' are as rare as any other's). Templates of different shapes scored a correct caption 3.73-4.46 by
# template (the earlier set, of which one named fewer attributes than the others), and CIDEr-D then ranked
# captioners partly by which template they prefer (`tests/test_coca.py::test_every_correct_caption_scores_alike`).
TEMPLATES = (
    'a {stroke} {word} written {slant}',
    'the {stroke} {word} drawn {slant}',
    'this {stroke} {word} is {slant}',
    'that {stroke} {word} sits {slant}',
    'some {stroke} {word} stands {slant}',
)
NUMBER_WORDS = digits.CLASS_NAMES


class Attributes(NamedTuple):
    """The measured attributes of one image (each a word or phrase of the captions)."""
    stroke: str
    slant: str


def measures(image: np.ndarray) -> np.ndarray:
    """One image uint8 [H,W] or [H,W,1] -> float64 [2]: ink mass (mean / 255) and slant (-mu11 / mu02) of the
    ink."""
    ink = np.asarray(image, np.float64).reshape(image.shape[0], image.shape[1])
    mass = ink.sum() + 1e-9
    ys, xs = np.mgrid[0:ink.shape[0], 0:ink.shape[1]]
    xb, yb = (ink * xs).sum() / mass, (ink * ys).sum() / mass
    mu11 = (ink * (xs - xb) * (ys - yb)).sum() / mass
    mu02 = (ink * (ys - yb) ** 2).sum() / mass + 1e-9
    return np.array([ink.mean() / 255.0, -mu11 / mu02])


@functools.cache
def class_medians() -> np.ndarray:
    """float64 [10, 2]: the median `measures` of each digit class over the training split (computed once from
    scikit-learn's bundled digits, upsampled as the dataset stores them)."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no download
    data = load_digits()
    train = np.arange(len(data.target)) % 5 != 0
    values = np.stack([measures(np.asarray(digits.upsample(v))) for v in data.images[train]])
    return np.stack([np.median(values[data.target[train] == c], axis=0) for c in range(len(NUMBER_WORDS))])


def attributes(label: int, image: np.ndarray) -> Attributes:
    """The attributes of `image` (uint8 [H,W(,1)]) of class `label`, each against its class median."""
    above = measures(image) > class_medians()[int(label)]
    return Attributes('thick' if above[0] else 'thin', 'leaning right' if above[1] else 'leaning left')


def references(label: int, image: np.ndarray) -> list[str]:
    """Every template filled for this image: its reference captions (len(TEMPLATES) strings)."""
    a = attributes(label, image)
    return [t.format(word=NUMBER_WORDS[int(label)], **a._asdict()) for t in TEMPLATES]


ATTRIBUTE_VALUES = Attributes(('thick', 'thin'), ('leaning right', 'leaning left'))


def zeroshot_templates() -> tuple[str, ...]:
    """Zero-shot prompt templates phrased as the described captions are ('{}' = the number word): every template
    filled with every combination of attribute values (20 distinct prompts per class), so a class's embedding
    averages over the attributes, as CLIP averages over its prompt ensemble (`config.eval.zeroshot_templates`)."""
    out: dict[str, None] = {}
    for stroke, slant in itertools.product(*ATTRIBUTE_VALUES):
        for t in TEMPLATES:
            out[t.format(word='{}', stroke=stroke, slant=slant)] = None
    return tuple(out)


def caption(label: int, rng: np.random.Generator, image: np.ndarray) -> str:
    """A training caption of `image` (class `label`): one template, drawn with `rng`."""
    return references(label, image)[int(rng.integers(len(TEMPLATES)))]


_NUMBER = re.compile(r'\b(' + '|'.join(NUMBER_WORDS) + r'|[0-9])\b')


def named_numbers(text: str) -> set[int]:
    """The numbers a caption names, as number words or numerals ({} when none)."""
    return {int(m) if m.isdigit() else NUMBER_WORDS.index(m) for m in _NUMBER.findall(text.lower())}
