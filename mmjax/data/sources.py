"""Captioned datasets for the training stream: builder specs, prepared TFDS datasets, weighted mixtures.

`config.data.name` picks the kind of data (`DATA_KINDS`):
  'digits'   the embedded digits (mmjax/data/digits.py; labelled, so zero-shot evaluation works).
  'spec'     one builder spec (mmjax/data/builders.py: webdataset / CSV / COCO): `config.data.spec` is the path
             or gs:// / s3:// URL of a JSON spec file (relative paths in it resolve against the file's folder)
             or an inline JSON object (relative paths against the working directory).
             Prepared into `data_dir/<spec name>/1.0.0/` on first use (progress bar), reused afterwards.
  'tfds'     an already-prepared TFDS dataset: `config.data.tfds_name` ('name', 'name/config' or
             'name:version') under `data_dir`, image feature `data.tfds_image_key`, caption feature
             `data.tfds_caption_key` (a Text, or a Sequence of Text; 'a/b' reaches into nested features).
  'wds_stream' webdataset / img2dataset tar shards named by the webdataset spec `config.data.spec`, read in
             place (local paths or object-store URLs) without preparing them: mmjax/data/stream.py.
  'mixture'  `config.data.mixture = (("a.json", 0.7), ("tfds:coco_captions", 0.3), ...)`: (source, weight)
             pairs; a source is a spec file path, an inline JSON spec, or 'tfds:<name>' (read with the
             tfds_* keys). Weights are relative (normalised to sum to 1) and must be > 0.

Records of every captioned source: {'image': encoded bytes, 'captions': sequence of UTF-8 bytes, ...}.

Mixture (`MixtureDataset`): global stream position k lies in block k // MIXTURE_BLOCK; each block of
MIXTURE_BLOCK positions holds exactly n_d positions of member d (n = weights x MIXTURE_BLOCK, rounded by
largest remainder, each >= 1), placed by a permutation seeded by (seed, block). Position k is member d's
element `block * n_d + rank of k among d's positions in the block`, an index into d's own endless shuffled
stream. So it is random access (any process reads any position), deterministic from the seed, exactly
resumable from the position alone, and the share of member d over any whole number of blocks is n_d / 1000:
within 0.0005 of its normalised weight, and within (0.0005 + MIXTURE_BLOCK / N) over N positions.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import grain.python as grain
import numpy as np

from mmjax import config as config_lib
from mmjax.data import builders, wds
from mmjax.data.decode import DecodeStats
from mmjax.errors import ConfigError

# digits_speech: mmjax/data/speech_triples.py; wds_stream: tar shards streamed in place (mmjax/data/stream.py)
DATA_KINDS = ('digits', 'digits_speech', 'spec', 'tfds', 'mixture', 'wds_stream')
MIXTURE_BLOCK = 1000
TFDS_PREFIX = 'tfds:'


@dataclasses.dataclass(frozen=True)
class Member:
    """One captioned dataset. kind 'spec' (spec: the raw spec dict) or 'tfds' (tfds_name)."""

    kind: str
    weight: float
    spec: Mapping[str, Any] | None = None
    tfds_name: str = ''

    @property
    def label(self) -> str:
        """Short name for metrics: the spec's name, or the TFDS name."""
        return str(self.spec['name']) if self.kind == 'spec' else self.tfds_name.replace('/', '_')


def parse_source(text: str, weight: float = 1.0) -> Member:
    """A mixture / spec source string -> Member. 'tfds:<name>' | '{...inline JSON spec...}' | spec file path or
    gs:// / s3:// URL (read through `mmjax.storage`; relative paths in it resolve against its folder).

    Raises ValueError (bad JSON), FileNotFoundError (no such spec file) or StorageError (an unreachable bucket)."""
    text = str(text).strip()
    if text.startswith(TFDS_PREFIX):
        name = text[len(TFDS_PREFIX):].strip()
        if not name:
            raise ValueError(f'source {text!r}: give a TFDS name after {TFDS_PREFIX!r}')
        return Member('tfds', float(weight), tfds_name=name)
    if text.startswith('{'):
        try:
            spec = json.loads(text)
        except ValueError as error:
            raise ValueError(f'inline JSON spec {text[:60]!r} is not valid JSON: {error}') from None
        return Member('spec', float(weight), spec=spec)
    return Member('spec', float(weight), spec=wds.load_spec_file(text))


def members(config) -> list[Member]:
    """The captioned datasets `config.data` names (an empty list for 'digits')."""
    data = config.data
    kind = data.name
    if kind in ('digits', 'digits_speech'):
        return []
    if kind == 'spec':
        return [parse_source(data.get('spec', ''))]
    if kind == 'tfds':
        return [Member('tfds', 1.0, tfds_name=str(data.get('tfds_name', '')))]
    if kind == 'mixture':
        return [parse_source(source, weight) for source, weight in data.get('mixture', ())]
    raise ValueError(f'config.data.name={kind!r} is not a known kind of data; choose one of {DATA_KINDS}')


def mixture_counts(weights: Sequence[float], block: int = MIXTURE_BLOCK) -> np.ndarray:
    """Positions per block of each member: weights normalised, x block, rounded by largest remainder.

    Raises ValueError for a weight <= 0 or one too small to get a position in a block."""
    weights = np.asarray(weights, np.float64)
    if weights.ndim != 1 or not len(weights) or not np.all(np.isfinite(weights)) or np.any(weights <= 0):
        raise ValueError(f'mixture weights must be finite and > 0, got {weights.tolist()}')
    exact = weights / weights.sum() * block
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind='stable')
    counts[order[: block - counts.sum()]] += 1
    if np.any(counts == 0):
        raise ValueError(f'mixture weights {weights.tolist()}: each must be at least 1/{block} of their sum')
    return counts


class MixtureDataset(grain.MapDataset):
    """Endless random-access weighted interleave of endless MapDatasets (see the module docstring)."""

    def __init__(self, parents: Sequence[grain.MapDataset], weights: Sequence[float], seed: int,
                 block: int = MIXTURE_BLOCK):
        super().__init__(list(parents))
        self._counts = mixture_counts(weights, block)
        if len(self._counts) != len(parents):
            raise ValueError(f'{len(parents)} datasets but {len(self._counts)} weights')
        self._block, self._seed = int(block), int(seed)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def counts(self) -> np.ndarray:
        return self._counts.copy()

    def __len__(self) -> int:
        return sys.maxsize

    def _layout(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """(owner member [block], rank of the position among its owner's positions [block]) of a block."""
        if block not in self._cache:
            if len(self._cache) >= 4:
                self._cache.clear()
            rng = np.random.default_rng([self._seed, block])
            owners = rng.permutation(np.repeat(np.arange(len(self._counts)), self._counts))
            ranks = np.empty(self._block, np.int64)
            for member, count in enumerate(self._counts):
                ranks[owners == member] = np.arange(count)
            self._cache[block] = (owners, ranks)
        return self._cache[block]

    def locate(self, index: int) -> tuple[int, int]:
        """Global position -> (member, index into the member's stream)."""
        block, slot = divmod(int(index), self._block)
        owners, ranks = self._layout(block)
        member = int(owners[slot])
        return member, block * int(self._counts[member]) + int(ranks[slot])

    def consumed(self, num_positions: int) -> np.ndarray:
        """How many of positions [0, num_positions) each member holds: int64 [members]."""
        block, slot = divmod(int(num_positions), self._block)
        owners, _ = self._layout(block)
        return block * self._counts + np.bincount(owners[:slot], minlength=len(self._counts))

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        member, inner = self.locate(index)
        return self._parents[member][inner]

    def __str__(self) -> str:
        return f'MixtureDataset(counts per {self._block}={self._counts.tolist()}, seed={self._seed})'


@dataclasses.dataclass(frozen=True)
class TfdsCaptioned(grain.MapTransform):
    """A TFDS record -> {'image': encoded bytes, 'captions': list of bytes, 'key': b''}.

    caption_key: 'a/b' reaches into nested features; the value is one Text or a sequence of them."""

    image_key: str
    caption_key: str

    def map(self, record: Mapping[str, Any]) -> dict[str, Any]:
        value: Any = record
        for part in self.caption_key.split('/'):
            value = value[part]
        captions = [value] if isinstance(value, (bytes, str, np.bytes_, np.str_)) else list(np.ravel(value))
        captions = [c if isinstance(c, bytes) else str(c).encode('utf-8') for c in captions]
        return {'image': record[self.image_key], 'captions': captions, 'key': b''}


@dataclasses.dataclass
class Opened:
    """A member opened for one split: its random-access source, the transform from its records to captioned
    records (None when they already are), and its prepare-time decode stats (empty for TFDS datasets)."""

    member: Member
    source: Any
    to_captioned: grain.MapTransform | None
    stats: DecodeStats


def open_member(member: Member, config, split: str, progress: bool = True) -> Opened:
    """Prepares (spec, first use) and opens `member`'s `split`."""
    data_dir = config_lib.data_dir(config)
    if member.kind == 'spec':
        stats = builders.prepare_dataset(member.spec, data_dir, progress=progress)
        name = member.spec['name']
        return Opened(member, builders.load_source(name, data_dir, split), None, stats.get(split, DecodeStats()))
    import tensorflow_datasets as tfds  # slow to import (seconds); only prepared TFDS datasets need it
    image_key = str(config.data.get('tfds_image_key', 'image'))
    caption_key = str(config.data.get('tfds_caption_key', 'caption'))
    try:
        source = tfds.data_source(member.tfds_name, split=split, data_dir=data_dir, download=False,
                                  decoders={image_key: tfds.decode.SkipDecoding()})
    except Exception as error:  # tfds raises AssertionError / DatasetNotFoundError / ValueError ...
        raise ConfigError([f'cannot open the TFDS dataset {member.tfds_name!r} (split {split!r}) under {data_dir} '
                           f'(config.data.tfds_name / data.mixture, data.data_dir): {type(error).__name__}: '
                           f'{error}']) from None
    return Opened(member, source, TfdsCaptioned(image_key, caption_key), DecodeStats())


__all__ = ['DATA_KINDS', 'MIXTURE_BLOCK', 'Member', 'MixtureDataset', 'Opened', 'TfdsCaptioned', 'members',
           'mixture_counts', 'open_member', 'parse_source']
