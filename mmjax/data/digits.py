"""The embedded default dataset: scikit-learn's 1,797 8x8 digits as a captioned TFDS array_record dataset.

Each 8x8 image (values 0..16) is scaled to 0..255 and upsampled to 32x32 with PIL bicubic interpolation,
stored as a grayscale PNG with its `label` (0..9) and `index` (position in `sklearn.datasets.load_digits`).
Splits: 'train' = index % 5 != 0 (1,437 images), 'test' = index % 5 == 0 (360 images, held out).
Captions are not stored: the pipeline draws one per example per epoch with `caption(label, rng)`.

A dataset module for the pipeline provides: `prepare(data_dir)`, `data_source(data_dir, split)`,
`caption(label, rng)`, `CLASS_NAMES`, `PROMPT_TEMPLATES`.
"""

from __future__ import annotations

import io
import os
import sys
import time

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from mmjax import storage
from mmjax.data.locking import file_lock

NAME = 'mmjax_digits'
IMAGE_SIZE = 32
NUM_EXAMPLES = 1797
SPLITS = ('train', 'test')

CLASS_NAMES = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')

# Training captions: `{word}` is the number word, `{digit}` the numeral.
CAPTION_TEMPLATES = (
    'a photo of the number {word}.',
    'handwritten {digit}',
    'the digit {word} written by hand',
    'a drawing of a {digit}',
    'a blurry scan of the digit {digit}.',
    'a hand-drawn {word}',
    'the number {digit} in low resolution',
    'a pixelated {word}',
    'someone wrote the number {word}',
    'a small grayscale image of a {digit}',
    'digit: {digit}',
    'a sketch of the numeral {word}.',
    'a {word}, written with a pen',
    'the handwritten number {digit}.',
)

# Zero-shot prompts, filled with a class name (the number word). Some repeat training phrasings, some are new.
PROMPT_TEMPLATES = (
    'a photo of the number {}.',
    'handwritten {}',
    'the digit {} written by hand',
    'a picture of the digit {}.',
    'an image of a handwritten {}.',
    'the number {}.',
)


# Caption style 'french' (config data.captions): a downstream task for fine-tuning (mmjax/training/finetune.py) -- the
# same images, captioned and prompted in French, whose number words the English-trained model has never read.
FRENCH_CLASS_NAMES = ('zéro', 'un', 'deux', 'trois', 'quatre', 'cinq', 'six', 'sept', 'huit', 'neuf')
FRENCH_CAPTION_TEMPLATES = (
    'une photo du nombre {word}.',
    '{digit} écrit à la main',
    'le chiffre {word} écrit à la main',
    'un dessin de {digit}',
    'un {word} dessiné à la main',
    'le nombre {digit} en basse résolution',
    'un {word} pixelisé',
    'quelqu\'un a écrit {word}',
    'chiffre : {digit}',
    'un croquis du chiffre {word}.',
    'un {word} écrit au stylo',
)
FRENCH_PROMPT_TEMPLATES = (
    'une photo du nombre {}.',
    'le chiffre {} écrit à la main',
    'une image du chiffre {}.',
    'un {} manuscrit.',
    'le nombre {}.',
)

# data.captions -> (class names, training caption templates, zero-shot prompt templates).
CAPTION_STYLES = {
    'english': (CLASS_NAMES, CAPTION_TEMPLATES, PROMPT_TEMPLATES),
    'french': (FRENCH_CLASS_NAMES, FRENCH_CAPTION_TEMPLATES, FRENCH_PROMPT_TEMPLATES),
}


def _style(style: str) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    if style not in CAPTION_STYLES:
        raise ValueError(f'data.captions: unknown caption style {style!r}; choose one of {sorted(CAPTION_STYLES)}')
    return CAPTION_STYLES[style]


def caption(label: int, rng: np.random.Generator, style: str = 'english') -> str:
    """A random training caption for `label` in caption `style`, drawn with `rng`."""
    names, templates, _ = _style(style)
    template = templates[rng.integers(len(templates))]
    return template.format(word=names[label], digit=str(label))


def prompts(style: str = 'english') -> tuple[list[str], list[str]]:
    """(class names, zero-shot prompt templates) of caption `style`."""
    names, _, templates = _style(style)
    return list(names), list(templates)


def upsample(values: np.ndarray, size: int = IMAGE_SIZE) -> Image.Image:
    """One 8x8 digit (values 0..16) -> grayscale PIL image [size, size], bicubic, ink bright on black."""
    pixels = np.round(np.asarray(values, np.float32) * (255.0 / 16.0)).astype(np.uint8)
    return Image.fromarray(pixels, mode='L').resize((size, size), Image.BICUBIC)


class MmjaxDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn digits, upsampled, split by index % 5."""

    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': '32x32 bicubic PNG, train = index % 5 != 0, test = index % 5 == 0.'}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # TFDS looks for a checksums file next to the builder's code through `importlib_resources`, which
        # may be absent; this builder downloads nothing, so there is no code path to search.
        return None

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 1), encoding_format='png'),
                'label': tfds.features.ClassLabel(names=CLASS_NAMES),
                'index': np.int32,
            }),
            homepage='https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html',
        )

    def _split_generators(self, dl_manager):
        from sklearn.datasets import load_digits  # bundled with scikit-learn, no download
        digits = load_digits()
        return {split: self._generate_examples(digits.images, digits.target, split) for split in SPLITS}

    def _generate_examples(self, images, labels, split):
        for index, (values, label) in enumerate(zip(images, labels)):
            if (index % 5 == 0) == (split == 'test'):
                # PNG bytes, not arrays: TFDS would call TensorFlow to encode a numpy image.
                buffer = io.BytesIO()
                upsample(values).save(buffer, format='PNG')
                yield index, {'image': buffer.getvalue(), 'label': int(label), 'index': index}


def is_prepared(data_dir: str) -> bool:
    """Whether a finished build is under `data_dir` (TFDS writes dataset_info.json last, then renames)."""
    return storage.isfile(storage.join(data_dir, NAME, str(MmjaxDigits.VERSION), 'dataset_info.json'))


def prepare(data_dir: str) -> str:
    """Builds the dataset under `data_dir` unless it is already there; returns `data_dir`.

    Safe against concurrent callers (a file lock; TFDS writes into a temporary folder and renames it).
    """
    storage.check_local(data_dir, 'data.data_dir', 'the embedded digits are built in a local data_dir')
    if is_prepared(data_dir):
        return data_dir
    os.makedirs(data_dir, exist_ok=True)  # local: checked above
    with file_lock(os.path.join(data_dir, f'.{NAME}.lock')):
        if is_prepared(data_dir):  # another process built it while we waited
            return data_dir
        builder = MmjaxDigits(data_dir=data_dir, file_format='array_record')
        print(f'mmjax: building the digits dataset ({NUM_EXAMPLES} images) in {data_dir} ...',
              file=sys.stderr, flush=True)
        start = time.perf_counter()
        tfds.display_progress_bar(False)
        try:
            builder.download_and_prepare()
        finally:
            tfds.display_progress_bar(True)
        print(f'mmjax: digits dataset ready in {time.perf_counter() - start:.1f}s', file=sys.stderr, flush=True)
    return data_dir


def data_source(data_dir: str, split: str):
    """Random-access source of `split` with records {'image': PNG bytes, 'label': int, 'index': int}."""
    if split not in SPLITS:
        raise ValueError(f'unknown split {split!r} for {NAME}; choose one of {SPLITS}')
    prepare(data_dir)
    return tfds.data_source(NAME, split=split, data_dir=data_dir, download=False,
                            decoders={'image': tfds.decode.SkipDecoding()})
