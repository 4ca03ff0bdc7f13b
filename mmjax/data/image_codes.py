"""Pre-tokenised images: a dataset's images replaced by an image tokenizer's codes, stored once as a TFDS
array_record dataset (as dalle-mini pre-encodes its data), so a model that reads codes (task 'text_to_image') does
not run the tokenizer in every training step.

Layout under `codes_dir` (local or a bucket):
  mmjax_image_codes/1.0.0/...   the TFDS dataset: one record per image {'codes': int32 [h*w] (row-major grid),
                                'label': int32 (-1 for a caption corpus), 'index': int32 (the source record's
                                position), 'captions': [bytes] (a caption corpus's captions; none for a labelled
                                dataset, whose captions are drawn from the label)}, the source's splits
  codes.json                    where the codes come from: {'tokenizer': the task 'vq' workdir, 'step': its
                                checkpoint, 'codebook_size', 'grid' (codes per side), 'dataset': `dataset_name`,
                                'splits': {split: records}}; written last, so its presence means complete

Written by `mmjax tokenize` (`mmjax/commands/tokenize.py`); read by the training stream when `data.codes_dir` is
set (`mmjax.data.pipeline.train_data`, with `CodesCaptionTokenize`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grain.python as grain
import numpy as np
import tensorflow_datasets as tfds

from mmjax import storage
from mmjax.data import sources
from mmjax.data.builders import record_captions
from mmjax.data.tokenizers import Tokenizer
from mmjax.errors import MmjaxError

NAME = 'mmjax_image_codes'
VERSION = '1.0.0'
INFO_FILE = 'codes.json'


class CodesError(MmjaxError, ValueError):
    """Pre-tokenised codes that cannot be written or read where asked (a folder already holding codes, or none)."""


class MmjaxImageCodes(tfds.core.GeneratorBasedBuilder):
    """The codes of a dataset's images; built from `examples` (split -> a function yielding (key, record) pairs),
    `num_codes` codes per image."""

    VERSION = tfds.core.Version(VERSION)
    RELEASE_NOTES = {str(VERSION): 'codes int32 [h*w], label, index, captions.'}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return None  # nothing is downloaded: no checksums file to look for next to the code

    def __init__(self, *, examples: dict[str, Callable[[], Iterator]] | None = None, num_codes: int = 0, **kwargs):
        self._examples, self._num_codes = examples or {}, int(num_codes)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            disable_shuffling=True,  # records in the order written: record i is the source's record i
            features=tfds.features.FeaturesDict({
                'codes': tfds.features.Tensor(shape=(self._num_codes,), dtype=np.int32),
                'label': np.int32,
                'index': np.int32,
                'captions': tfds.features.Sequence(tfds.features.Text()),
            }),
        )

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in self._examples}

    def _generate_examples(self, split):
        yield from self._examples[split]()


def write(codes_dir: str, splits: dict[str, Callable[[], Iterable[dict[str, np.ndarray]]]], num_codes: int,
          info: dict) -> dict:
    """Builds the dataset under `codes_dir` from `splits` (split -> a function returning an iterable of records
    {'codes': int [num_codes], 'label': int, 'index': int, 'captions': [bytes] (optional)}, in the source's order,
    which the dataset keeps: a training stream over it then visits the records a stream over the source would),
    then writes `INFO_FILE` = `info` plus the record count of each split. CodesError for a `codes_dir` that
    already holds codes. Returns the written info."""
    if storage.exists(storage.join(codes_dir, INFO_FILE)) or storage.exists(storage.join(codes_dir, NAME)):
        raise CodesError(f'{codes_dir} already holds pre-tokenised codes; give a new folder')
    counts = {split: 0 for split in splits}

    def keyed(split):
        def make():
            for position, record in enumerate(splits[split]()):
                counts[split] += 1
                yield position, {'codes': np.asarray(record['codes'], np.int32).reshape(num_codes),
                                 'label': np.int32(record['label']), 'index': np.int32(record['index']),
                                 'captions': list(record.get('captions', ()))}
        return make

    builder = MmjaxImageCodes(examples={s: keyed(s) for s in splits}, num_codes=num_codes, data_dir=codes_dir,
                              file_format='array_record')
    tfds.display_progress_bar(False)
    try:
        builder.download_and_prepare()
    finally:
        tfds.display_progress_bar(True)
    info = dict(info, splits=counts)
    storage.write_text_atomic(storage.join(codes_dir, INFO_FILE), json.dumps(info, indent=1))
    return info


def read_info(codes_dir: str) -> dict:
    """`INFO_FILE` of `codes_dir`; CodesError naming the folder when it holds no finished codes."""
    path = storage.join(codes_dir, INFO_FILE)
    if not storage.exists(path):
        raise CodesError(f'data.codes_dir={codes_dir!r} holds no pre-tokenised codes (no {INFO_FILE}); '
                         f'write them with `mmjax tokenize --workdir <tokenizer> --out {codes_dir}`')
    return json.loads(storage.read_text(path))


def data_source(codes_dir: str, split: str):
    """Random-access source of `split`'s records {'codes': int32 [h*w], 'label', 'index', 'captions'}."""
    splits = read_info(codes_dir)['splits']
    if split not in splits:
        raise CodesError(f'data.codes_dir={codes_dir!r} has no split {split!r}; it has {sorted(splits)}')
    builder = tfds.builder_from_directory(storage.join(codes_dir, NAME, VERSION))
    return builder.as_data_source(split=split)


def dataset_name(config) -> str:
    """What codes.json records as the dataset: config.data.name for a labelled dataset, else 'spec:<name>' or
    'tfds:<name>' of the one captioned dataset config.data names (a mixture: ValueError)."""
    found = sources.members(config)
    if not found:
        return str(config.data.name)
    if len(found) > 1:
        raise ValueError(f'config.data.mixture names {len(found)} datasets; pre-tokenise one dataset at a time')
    return f'{found[0].kind}:{found[0].label}'


@dataclasses.dataclass(frozen=True)
class CodesCaptionTokenize(grain.RandomMapTransform):
    """A record {'codes', 'label', 'index', 'captions'} -> {'codes': int32 [h*w], 'text': int32 [max_len],
    'label': int32}: the caption is drawn uniformly from the record's captions (a caption corpus, as
    `mmjax.data.decode.DecodeCropTokenize` draws it), else by `caption_fn` for the label (a labelled dataset, as
    `mmjax.data.pipeline.CaptionAugmentTokenize` draws it)."""

    caption_fn: Callable[[int, np.random.Generator], str] | None
    tokenizer: Tokenizer

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        label, captions = int(element['label']), record_captions(element)
        caption = captions[int(rng.integers(len(captions)))] if captions else self.caption_fn(label, rng)
        text = self.tokenizer.encode([caption])[0]
        return {'codes': np.asarray(element['codes'], np.int32), 'text': text, 'label': np.int32(label)}
