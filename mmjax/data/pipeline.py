"""grain input pipeline: one global example stream, identical on every process, cut into per-process slices.

    TFDS array_record source -> global shuffle (config.seed, a new permutation every epoch) -> repeat forever
    -> decode -> caption, augment, tokenize (RNG keyed by the GLOBAL stream position)
    -> global batch g = stream positions [g*B, (g+1)*B); process p of n takes [g*B + p*b, g*B + (p+1)*b), b = B/n
    -> batch -> `config.data.num_workers` worker processes.

Every process builds the same global stream and reads (decodes, augments) only its own positions, by index
arithmetic. So the global batches, example for example (images, captions, augmentations), do not depend on
the number of processes or workers: concatenating the host batches of processes 0..n-1 gives the 1-process
batch. The iterator state is the number of global examples consumed (plus the epoch, for information), the
same on every process, so a run can resume on another process count, worker count or global batch size.

Sources (config.data.name, see mmjax/data/sources.py): 'digits' (records {'image': PNG, 'label', 'index'},
captions drawn from the label, random_affine augmentation) or captioned data - 'spec' (a webdataset / CSV /
COCO builder spec, prepared on first use), 'tfds' (an already-prepared TFDS dataset), 'mixture' (weighted
interleave of several; sources.MixtureDataset keeps it a function of the global position) - whose records
{'image': encoded bytes, 'captions': [bytes]} go through decode.DecodeCropTokenize (decode, random-resized
crop + flip when config.data.augment else resize + center crop, normalise, one caption drawn per example).
'wds_stream' (tar shards streamed in place, no preparation) is not a global stream: `stream_loader` hands it to
mmjax/data/stream.py, whose batches depend on the process count.

Config keys read: config.seed, config.train.batch_size, config.data.{name, data_dir, num_workers, augment,
image_mean, image_std, spec, tfds_name, tfds_image_key, tfds_caption_key, mixture, crop_scale, train_split,
shuffle_buffer, open_shards},
config.model.image.{image_size, channels}, config.model.text.{tokenizer, tokenizer_path, vocab_size, max_len}.
"""

from __future__ import annotations

import dataclasses
import functools
import io
from collections.abc import Callable
from typing import Any

import grain.python as grain
import numpy as np
from absl import flags
from PIL import Image

from mmjax import config as config_lib
from mmjax.data import digit_captions, digits, image_codes, sources, speech_triples, stream, wds
from mmjax.data.decode import BAD_KINDS, DecodeCropTokenize, DecodeStats
from mmjax.data.image import preprocess_images, random_affine
from mmjax.data.iterators import InnerIteratorOwner
from mmjax.data.tokenizers import Tokenizer, get_tokenizer
from mmjax.errors import ConfigError

# Elements of the iterator are whole host batches: one reader thread (per worker process) computes the next
# few in the background; the per-record transforms hold the GIL, so more threads only contend.
READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)

# name (config.data.name) -> dataset module (see mmjax/data/digits.py for what a module provides).
DATASETS = {'digits': digits, 'digits_speech': speech_triples}  # speech_triples: digits + spoken clips


def labelled_dataset(config):
    """The labelled dataset module of config.data.name (class names, caption function); captioned data has none."""
    name = config.data.name
    if name in DATASETS:
        return DATASETS[name]
    if name in sources.DATA_KINDS:
        raise ValueError(f'config.data.name={name!r} is captioned data without class labels or class prompts; '
                         f'this needs a labelled dataset ({sorted(DATASETS)})')
    raise ValueError(f'config.data.name={name!r} is not a known kind of data; choose one of {sources.DATA_KINDS}')


def is_captioned(config) -> bool:
    """Whether config.data names captioned data (spec / tfds / mixture) rather than a labelled dataset."""
    return config.data.name in sources.DATA_KINDS and config.data.name not in DATASETS


def zeroshot_unavailable(config) -> str | None:
    """Why zero-shot classification cannot run on config.data (None when it can)."""
    if is_captioned(config):
        return (f'config.data.name={config.data.name!r} is a caption corpus without class labels or class '
                f'prompts')
    return None


def make_source(config, split: str):
    """Random-access source of `split` (built on first use) with records {'image': PNG bytes, 'label', 'index'}."""
    return labelled_dataset(config).data_source(config_lib.data_dir(config), split)


@dataclasses.dataclass(frozen=True)
class BatchedReads:
    """A data source with a `__getitems__` (TFDS) exposed through grain's batched-read hook `_getitems`, so a
    batch costs one array_record read instead of one per record."""

    source: Any

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Any:
        return self.source[index]

    def _getitems(self, indices) -> list[Any]:
        return list(self.source.__getitems__([int(i) for i in indices]))


def stream_seeds(seed: int) -> tuple[int, int]:
    """config.seed -> (shuffle seed, caption/augmentation seed), independent 32-bit seeds.

    Hashed, because grain's shuffle uses `shuffle_seed + epoch` for epoch `epoch`: raw seeds s and s + 1
    would give the same permutations one epoch apart.
    """
    if int(seed) != seed or seed < 0:
        raise ValueError(f'config.seed={seed!r} must be a non-negative integer')
    shuffle_seed, map_seed = np.random.SeedSequence(int(seed)).generate_state(2, dtype=np.uint32)
    return int(shuffle_seed), int(map_seed)


def member_shuffle_seed(seed: int, member: int) -> int:
    """Shuffle seed of mixture member `member` (0, 1, ...): member 0 keeps the single-dataset seed."""
    if member == 0:
        return stream_seeds(seed)[0]
    return int(np.random.SeedSequence([int(seed), int(member)]).generate_state(1, dtype=np.uint32)[0])


def shuffled_records(source, seed: int, member: int = 0) -> grain.MapDataset:
    """Endless MapDataset of raw records: element k is record perm_e[k % N] of epoch e = k // N, N = len(source),
    with a different permutation perm_e for every epoch (`member` selects a mixture member's own seed)."""
    shuffle_seed = member_shuffle_seed(seed, member)
    if hasattr(source, '__getitems__'):
        source = BatchedReads(source)
    # shuffle then repeat: ShuffleMapDataset maps index k to epoch k // N with its own seed, so each epoch of
    # the repeat is a new permutation (repeat then shuffle would shuffle an infinite index range).
    return grain.MapDataset.source(source).shuffle(seed=shuffle_seed).repeat(None)


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
    with_image: bool = False  # caption_fn(label, rng, image uint8 [H,W,C]): captions from the pixels

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        label = int(element['label'])
        caption = self.caption_fn(label, rng, element['image']) if self.with_image else self.caption_fn(label, rng)
        text = self.tokenizer.encode([caption])[0]
        image = element['image']
        if self.augment:
            image = random_affine(image, rng)
        image = preprocess_images(image[None], self.image_size, self.channels, self.mean, self.std)[0]
        return {'image': image, 'text': text, 'label': np.int32(label)}


# Probability that a matching-pairs example shows the caption of its own image (label 1).
MATCH_PROB = 0.5


def pair_caption(caption_fn, digit: int, num_classes: int, rng: np.random.Generator) -> tuple[str, int]:
    """(caption, label): a caption of `digit` (label 1) with probability MATCH_PROB, else of another class
    drawn uniformly (label 0)."""
    match = rng.random() < MATCH_PROB
    shown = digit if match else (digit + int(rng.integers(1, num_classes))) % num_classes
    return caption_fn(shown, rng), int(match)


@dataclasses.dataclass(frozen=True)
class PairAugmentTokenize(CaptionAugmentTokenize):
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


# what the stream's examples are: image-caption, matching pairs, or captions described from the pixels
# (labelled digits: mmjax/data/digit_captions.py; caption corpora: their own captions)
EXAMPLES = ('captions', 'pairs', 'described')


def global_stream(config, source, examples: str = 'captions') -> grain.MapDataset:
    """Endless MapDataset of model-ready examples; element k is global stream position k, the same on every
    process: {'image': float32 [H,W,C], 'text': int32 [L], 'label': int32}. With examples='pairs' they are
    image-caption matching pairs (PairAugmentTokenize: 'label' = 1 if the caption matches, plus 'digit')."""
    _, map_seed = stream_seeds(config.seed)
    img = config.model.image
    size, channels = int(img.image_size), int(img.channels)
    mean = tuple(np.ravel(config.data.image_mean).tolist())
    std = tuple(np.ravel(config.data.image_std).tolist())
    preprocess_images(np.zeros((1, size, size), np.uint8), size, channels, mean, std)  # config errors now
    fields = dict(caption_fn=caption_fn(config), tokenizer=get_tokenizer(config.model.text),
                  augment=bool(config.data.augment), image_size=size, channels=channels, mean=mean, std=std)
    if examples == 'pairs':
        transform = PairAugmentTokenize(num_classes=len(labelled_dataset(config).CLASS_NAMES), **fields)
    elif examples == 'described':
        transform = CaptionAugmentTokenize(**dict(fields, caption_fn=digit_captions.caption), with_image=True)
    else:
        transform = CaptionAugmentTokenize(**fields)
    # random_map seeds each element's RNG with (map_seed, its index here) = the global position.
    stream = shuffled_records(source, config.seed).map(DecodeExample()).random_map(transform, seed=map_seed)
    if config.data.name == speech_triples.NAME and 'audio' in tuple(config.model.get('towers', ())):
        stream = speech_triples.add_speech(config, stream, config_lib.data_dir(config))  # + 'audio' per example
    return stream


def _image_fields(config) -> tuple[int, int, tuple[float, ...], tuple[float, ...]]:
    img = config.model.image
    size, channels = int(img.image_size), int(img.channels)
    mean = tuple(np.ravel(config.data.image_mean).tolist())
    std = tuple(np.ravel(config.data.image_std).tolist())
    preprocess_images(np.zeros((1, size, size), np.uint8), size, channels, mean, std)  # config errors now
    return size, channels, mean, std


def captioned_records(config, opened: list[sources.Opened]) -> grain.MapDataset:
    """Endless MapDataset of captioned records {'image': bytes, 'captions': [bytes], ...}: element k is
    global position k - one member's shuffled stream, or the weighted MixtureDataset of several."""
    streams = []
    for member, item in enumerate(opened):
        stream = shuffled_records(item.source, config.seed, member)
        if item.to_captioned is not None:
            stream = stream.map(item.to_captioned)
        streams.append(stream)
    if len(streams) == 1:
        return streams[0]
    _, map_seed = stream_seeds(config.seed)
    return sources.MixtureDataset(streams, [item.member.weight for item in opened], seed=map_seed)


def captioned_stream(config, records: grain.MapDataset, examples: str = 'captions') -> grain.MapDataset:
    """Captioned records -> endless model-ready stream {'image': float32 [H,W,C], 'text': int32 [L],
    'label': int32 -1}; the per-position RNG draws the caption and the crop."""
    _, map_seed = stream_seeds(config.seed)
    return records.random_map(decode_transform(config, examples), seed=map_seed)


def decode_transform(config, examples: str = 'captions') -> DecodeCropTokenize:
    """The transform from captioned records to model-ready examples (decode, crop, tokenize)."""
    if examples == 'pairs':
        raise ValueError(f"matching pairs need labelled data (config.data.name='digits'), not "
                         f"config.data.name={config.data.name!r}")
    size, channels, mean, std = _image_fields(config)
    scale = tuple(float(v) for v in config.data.get('crop_scale', (0.08, 1.0)))
    return DecodeCropTokenize(tokenizer=get_tokenizer(config.model.text), size=size, mean=mean, std=std,
                              train=bool(config.data.augment), scale=scale, channels=channels)


@dataclasses.dataclass
class TrainData:
    """The endless global training stream and what `TrainIterator.stats` reports about it.

    sizes: records per member ({dataset name: N}); bad: prepare-time decode stats per member;
    mixture: the MixtureDataset when several members are mixed (for per-member counts), else None."""

    stream: grain.MapDataset
    sizes: dict[str, int]
    bad: dict[str, DecodeStats]
    mixture: sources.MixtureDataset | None = None


def train_data(config, split: str | None = None, progress: bool = True, examples: str = 'captions') -> TrainData:
    """Builds (preparing captioned datasets on first use, with a progress bar when `progress`) the global
    stream of `split` (default config.data.train_split, else 'train') of `examples` (EXAMPLES)."""
    if examples not in EXAMPLES:
        raise ValueError(f'examples={examples!r}; choose one of {EXAMPLES}')
    split = split or config.data.get('train_split', 'train') or 'train'
    if config.data.get('codes_dir'):
        return codes_data(config, split, examples)
    if not is_captioned(config):
        source = make_source(config, split)
        return TrainData(global_stream(config, source, examples), {config.data.name: len(source)}, {})
    opened = [sources.open_member(m, config, split, progress) for m in sources.members(config)]
    if not opened:
        raise ValueError(f"config.data.mixture is empty; give ((source, weight), ...) for config.data.name="
                         f"{config.data.name!r}")
    labels = [item.member.label for item in opened]
    if len(set(labels)) != len(labels):
        raise ValueError(f'config.data.mixture names a dataset twice: {labels}')
    records = captioned_records(config, opened)
    return TrainData(captioned_stream(config, records, examples), {l: len(o.source) for l, o in zip(labels, opened)},
                     {l: o.stats for l, o in zip(labels, opened)},
                     records if isinstance(records, sources.MixtureDataset) else None)


def codes_data(config, split: str, examples: str = 'captions') -> TrainData:
    """The training stream of pre-tokenised images (data.codes_dir, `mmjax.data.image_codes`): {'codes', 'text',
    'label'} per example, the caption drawn per position as for the images; image-caption examples only."""
    if examples != 'captions':
        raise ValueError(f'data.codes_dir: pre-tokenised codes serve image-caption examples, not {examples!r}')
    source = image_codes.data_source(config.data.codes_dir, split)
    _, map_seed = stream_seeds(config.seed)
    captions = None if is_captioned(config) else caption_fn(config)  # a corpus's records carry their captions
    transform = image_codes.CodesCaptionTokenize(captions, get_tokenizer(config.model.text))
    stream = shuffled_records(source, config.seed).random_map(transform, seed=map_seed)
    return TrainData(stream, {f'{image_codes.dataset_name(config)} codes': len(source)}, {})


def host_batches(stream: grain.MapDataset, start: int, global_batch: int, process_index: int,
                 process_count: int) -> grain.MapDataset:
    """MapDataset of this process's batches of `stream[start:]`: element g is positions
    [start + g*B + p*b, start + g*B + (p+1)*b) with B = global_batch, b = B / process_count, p = process_index.

    Lazy: only this process's positions are ever read."""
    host_batch = global_batch // process_count
    return stream[start:].batch(host_batch, drop_remainder=True)[process_index::process_count]


class TrainIterator(InnerIteratorOwner):
    """Endless iterator of one process's host batches, resumable on any process / worker count.

    State: {'examples_seen': global examples consumed (all processes together), 'epoch': examples_seen // N}.
    It is the same on every process. `set_state` rebuilds the pipeline at that position (lazily: the workers
    start at the first `next` or `start_prefetch`).
    """

    def __init__(self, config, process_index: int, process_count: int, examples: str = 'captions'):
        super().__init__()
        self._inner: grain.DatasetIterator | None = None
        if not 0 <= process_index < process_count:
            raise ValueError(f'process_index={process_index} must be in [0, process_count={process_count})')
        self._host_batch = _host_batch_size(config, process_count)
        self._global_batch = self._host_batch * process_count
        self._process_index, self._process_count = process_index, process_count
        self._num_workers = int(config.data.num_workers)
        if self._num_workers < 0:
            raise ValueError(f'config.data.num_workers={self._num_workers} must be >= 0')
        self._data = train_data(config, progress=process_index == 0, examples=examples)
        self._num_records = sum(self._data.sizes.values())
        self._stream = self._data.stream
        self._examples_seen = 0

    def _start(self) -> grain.DatasetIterator:
        if self._inner is None:
            batches = host_batches(self._stream, self._examples_seen, self._global_batch, self._process_index,
                                   self._process_count).to_iter_dataset(READ_OPTIONS)
            if self._num_workers > 0:
                _mark_absl_flags_parsed()
                batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._num_workers))
            self._inner = iter(batches)
        return self._inner

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        batch = next(self._start())
        self._examples_seen += self._global_batch
        return batch

    def stats(self) -> dict[str, float]:
        """Data metrics for the training log: 'data/bad_samples' and 'data/bad/<kind>' (samples skipped when
        the datasets were prepared; records are never skipped at read time, which would change the global
        stream, and a read-time decode failure stops the run naming the record), 'data/bad_fraction',
        'data/epoch' (examples seen / records, fractional) and, for a mixture, 'data/epoch/<name>' and
        'data/share/<name>' (fraction of the examples seen that came from that dataset)."""
        bad = DecodeStats()
        for stats in self._data.bad.values():
            bad.update(stats)
        out = {'data/bad_samples': float(bad.num_bad), 'data/bad_fraction': float(bad.bad_fraction),
               'data/epoch': self._examples_seen / self._num_records}
        out.update({f'data/bad/{kind}': float(bad.skipped.get(kind, 0)) for kind in BAD_KINDS})
        if self._data.mixture is not None:
            consumed = self._data.mixture.consumed(self._examples_seen)
            for (name, size), count in zip(self._data.sizes.items(), consumed):
                out[f'data/epoch/{name}'] = float(count) / size
                out[f'data/share/{name}'] = float(count) / max(self._examples_seen, 1)
        return out

    def get_state(self) -> dict[str, Any]:
        return {'examples_seen': self._examples_seen, 'epoch': self._examples_seen // self._num_records}

    def set_state(self, state: dict[str, Any]) -> None:
        examples_seen = int(state['examples_seen'])
        if examples_seen < 0:
            raise ValueError(f'iterator state {state} has a negative examples_seen')
        self._stop_inner()
        self._examples_seen = examples_seen


    def __str__(self) -> str:
        return (f'TrainIterator(process {self._process_index}/{self._process_count}, '
                f'host batch {self._host_batch}, examples_seen={self._examples_seen})')


def make_train_loader(config, process_index: int = 0, process_count: int = 1,
                      examples: str = 'captions') -> TrainIterator | stream.StreamIterator:
    """Endless iterator of this process's batches (supports `get_state()` / `set_state(state)`).

    Yields {'image': float32 [b,H,W,C], 'text': int32 [b,L], 'label': int32 [b]} with
    b = config.train.batch_size // process_count, H = W = config.model.image.image_size,
    C = config.model.image.channels, L = config.model.text.max_len. Batch g of process p holds global
    stream positions [g*B + p*b, g*B + (p+1)*b), B = config.train.batch_size. examples='pairs': image-caption
    matching pairs of labelled data (see `global_stream`). data.name='wds_stream': batches streamed from tar
    shards, which depend on the process count (`stream_loader`).
    """
    if config.data.name == stream.KIND:
        return stream_loader(config, process_index, process_count, examples)
    return TrainIterator(config, process_index, process_count, examples)


def stream_loader(config, process_index: int = 0, process_count: int = 1,
                  examples: str = 'captions') -> stream.StreamIterator:
    """data.name='wds_stream': this process's batches read from the tar shards of `data.spec` in place
    (mmjax/data/stream.py), same keys, dtypes and shapes as the prepared path."""
    spec = wds.stream_spec(config.data.spec, config.data.get('train_split', 'train') or 'train')
    transform = dataclasses.replace(decode_transform(config, examples), limits=spec.limits)
    shuffle_seed, map_seed = stream_seeds(config.seed)
    plan = stream.Plan(spec, transform, process_index, process_count, shuffle_seed, map_seed,
                       int(config.data.shuffle_buffer), int(config.data.open_shards))
    return stream.StreamIterator(plan, _host_batch_size(config, process_count), int(config.data.num_workers))


def load_eval_split(config, split: str = 'test') -> dict[str, np.ndarray]:
    """The whole `split`, sorted by example index, preprocessed without augmentation.

    Returns {'image': float32 [N,H,W,C], 'label': int32 [N]}.
    """
    if is_captioned(config):
        raise ConfigError([f'data.name: {zeroshot_unavailable(config)}, so it has no labelled eval split; evaluate '
                           f"on a labelled dataset (--config.data.name=digits)"])
    source = make_source(config, split)
    decode = DecodeExample()
    records = sorted((decode.map(source[i]) for i in range(len(source))), key=lambda r: int(r['index']))
    img = config.model.image
    images = preprocess_images(np.stack([r['image'] for r in records]), int(img.image_size), int(img.channels),
                               config.data.image_mean, config.data.image_std)
    return {'image': images, 'label': np.array([r['label'] for r in records], np.int32)}


def caption_fn(config) -> Callable[[int, np.random.Generator], str]:
    """The digits' caption(label, rng) in the caption style `config.data.captions` ('english' | 'french')."""
    style = config.data.get('captions', 'english') or 'english'
    return labelled_dataset(config).caption if style == 'english' else functools.partial(digits.caption, style=style)


def zeroshot_prompts(config) -> tuple[list[str], list[str]]:
    """(class_names, templates) of the configured dataset and caption style (`config.data.captions`);
    prompts are template.format(class_name). `config.eval.zeroshot_templates`, when set, replaces the templates."""
    style = config.data.get('captions', 'english') or 'english'
    if style != 'english':
        names, templates = digits.prompts(style)
    else:
        dataset = labelled_dataset(config)
        names, templates = list(dataset.CLASS_NAMES), list(dataset.PROMPT_TEMPLATES)
    chosen = tuple((config.get('eval') or {}).get('zeroshot_templates', ()) or ())
    return names, (list(chosen) if chosen else templates)
