"""grain input pipeline: TFDS array_record source -> shard by process -> shuffle -> decode -> caption,
augment, tokenize -> batch.

The iterator returned by `make_train_loader` has `get_state()` / `set_state()`; restoring a state into a
fresh loader built from the same config continues with exactly the same batches. Randomness (shuffle,
caption choice, augmentation) derives only from `config.seed` and the record's position in the stream.

Config keys read: config.seed, config.train.batch_size, config.data.{name, data_dir, num_workers, augment,
image_mean, image_std}, config.model.image.{image_size, channels}, config.model.text.{tokenizer, vocab_size,
max_len}.
"""

from __future__ import annotations

import dataclasses
import io
import os
from typing import Any, Callable

import grain.python as grain
import numpy as np
from absl import flags
from PIL import Image

from mmjax.data import digits
from mmjax.data.image import preprocess_images, random_affine
from mmjax.data.tokenizers import Tokenizer, get_tokenizer

# grain's default (16 threads, 500-record prefetch) costs ~2x here: records are small and the per-record
# transforms hold the GIL, so one reader thread with a short buffer keeps up and contends less.
READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=64)

# name (config.data.name) -> dataset module (see mmjax/data/digits.py for what a module provides).
DATASETS = {'digits': digits}


def _dataset(config):
    name = config.data.name
    if name not in DATASETS:
        raise ValueError(f'config.data.name={name!r} is not a known dataset; choose one of {sorted(DATASETS)}')
    return DATASETS[name]


def resolve_data_dir(config) -> str:
    """config.data.data_dir, or $MMJAX_DATA_DIR, or ~/.cache/mmjax/tfds when it is empty / None."""
    if config.data.data_dir:
        return os.path.abspath(os.path.expanduser(config.data.data_dir))
    return os.environ.get('MMJAX_DATA_DIR', os.path.expanduser('~/.cache/mmjax/tfds'))


def make_source(config, split: str):
    """Random-access source of `split` (built on first use) with records {'image': PNG bytes, 'label', 'index'}."""
    return _dataset(config).data_source(resolve_data_dir(config), split)


def make_sampler(config, num_records: int, process_index: int, process_count: int) -> grain.IndexSampler:
    """Infinite shuffled sampler over this process's shard (equal shards, the remainder is dropped)."""
    return grain.IndexSampler(
        num_records=num_records,
        shard_options=grain.ShardOptions(shard_index=process_index, shard_count=process_count,
                                         drop_remainder=True),
        shuffle=True, num_epochs=None, seed=int(config.seed))


@dataclasses.dataclass(frozen=True)
class DecodeExample(grain.MapTransform):
    """{'image': PNG bytes, 'label', 'index'} -> {'image': uint8 [H,W,C], 'label': int32, 'index': int32}."""

    def map(self, element: dict[str, Any]) -> dict[str, Any]:
        image = np.asarray(Image.open(io.BytesIO(element['image'])))
        if image.ndim == 2:
            image = image[..., None]
        return {'image': image, 'label': np.int32(element['label']), 'index': np.int32(element['index'])}


@dataclasses.dataclass(frozen=True)
class CaptionAugmentTokenize(grain.RandomMapTransform):
    """Draws a caption and (optionally) an augmentation per example; returns model-ready arrays.

    Output: {'image': float32 [image_size, image_size, channels], 'text': int32 [max_len], 'label': int32}.
    """

    caption_fn: Callable[[int, np.random.Generator], str]
    tokenizer: Tokenizer
    augment: bool
    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        label = int(element['label'])
        text = self.tokenizer.encode([self.caption_fn(label, rng)])[0]
        image = element['image']
        if self.augment:
            image = random_affine(image, rng)
        image = preprocess_images(image[None], self.image_size, self.channels, self.mean, self.std)[0]
        return {'image': image, 'text': text, 'label': np.int32(label)}


def _host_batch_size(config, process_count: int) -> int:
    batch_size = int(config.train.batch_size)
    if batch_size <= 0 or batch_size % process_count:
        raise ValueError(f'config.train.batch_size={batch_size} must be a positive multiple of the '
                         f'process count {process_count}')
    return batch_size // process_count


def _mark_absl_flags_parsed() -> None:
    """grain 0.2.18 reads an absl flag when starting workers in a process that imported jax, which fails
    outside an absl app (google/grain#1355); the flags are marked parsed, keeping their defaults."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_train_loader(config, process_index: int = 0, process_count: int = 1) -> grain.PyGrainDatasetIterator:
    """Endless iterator of this process's batches (supports `get_state()` / `set_state(state)`).

    Yields {'image': float32 [b,H,W,C], 'text': int32 [b,L], 'label': int32 [b]} with
    b = config.train.batch_size // process_count, H = W = config.model.image.image_size,
    C = config.model.image.channels, L = config.model.text.max_len.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f'process_index={process_index} must be in [0, process_count={process_count})')
    host_batch = _host_batch_size(config, process_count)
    dataset = _dataset(config)
    source = make_source(config, 'train')
    img = config.model.image
    size, channels = int(img.image_size), int(img.channels)
    mean = tuple(np.ravel(config.data.image_mean).tolist())
    std = tuple(np.ravel(config.data.image_std).tolist())
    preprocess_images(np.zeros((1, size, size), np.uint8), size, channels, mean, std)  # config errors now
    operations = [
        DecodeExample(),
        CaptionAugmentTokenize(
            caption_fn=dataset.caption, tokenizer=get_tokenizer(config.model.text),
            augment=bool(config.data.augment), image_size=size, channels=channels, mean=mean, std=std),
        grain.Batch(batch_size=host_batch, drop_remainder=True),
    ]
    if config.data.num_workers > 0:
        _mark_absl_flags_parsed()
    loader = grain.DataLoader(
        data_source=source,
        sampler=make_sampler(config, len(source), process_index, process_count),
        operations=operations,
        worker_count=int(config.data.num_workers),
        read_options=READ_OPTIONS)
    return iter(loader)


def load_eval_split(config, split: str = 'test') -> dict[str, np.ndarray]:
    """The whole `split`, sorted by example index, preprocessed without augmentation.

    Returns {'image': float32 [N,H,W,C], 'label': int32 [N]}.
    """
    source = make_source(config, split)
    decode = DecodeExample()
    records = sorted((decode.map(source[i]) for i in range(len(source))), key=lambda r: int(r['index']))
    img = config.model.image
    images = preprocess_images(np.stack([r['image'] for r in records]), int(img.image_size), int(img.channels),
                               config.data.image_mean, config.data.image_std)
    return {'image': images, 'label': np.array([r['label'] for r in records], np.int32)}


def zeroshot_prompts(config) -> tuple[list[str], list[str]]:
    """(class_names, templates) of the configured dataset; prompts are template.format(class_name)."""
    dataset = _dataset(config)
    return list(dataset.CLASS_NAMES), list(dataset.PROMPT_TEMPLATES)
