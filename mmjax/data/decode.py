"""Robust decode stage for web-scale image-text data: every bad sample is skipped and counted by kind.

Bad kinds (`BAD_KINDS`):
  missing_file     a path (CSV / COCO) that does not exist or cannot be read
  empty_image      zero-byte image data
  too_many_pixels  header says width * height > `DecodeLimits.max_pixels` (checked BEFORE any pixel is decoded,
                   so a decompression bomb costs only its header read) or PIL refuses it as a bomb
  bad_image        bytes PIL cannot identify, or truncated / corrupt pixel data (found by a full decode)
  tiny_image       a side below `DecodeLimits.min_side`
  empty_caption    no caption left after stripping whitespace
  bad_caption      caption bytes that are not UTF-8
  long_caption     caption longer than `DecodeLimits.max_caption_chars` (far over any text length; such text is
                   boilerplate or scraped page dumps, not a caption)

`DecodeStats` counts samples seen / kept / skipped per kind; `metrics()` gives flat scalars for the metric
writer and `check(where)` raises `BadDataError` naming the shard / file when its bad fraction exceeds
`DecodeLimits.max_bad_fraction`: judged per file at its end, and before the end only once the file's bad samples
alone exceed the limit of its whole length (the rest of the file can no longer bring it back under). The builders
in `mmjax/data/builders.py` run `check_sample` at prepare time (bad samples never reach the array_record files);
`decode_image` is the read-time decoder (RGB uint8) and `random_resized_crop` the training crop of decoded pixels
(Inception-style scale/ratio, one fused PIL crop+resize, optional flip). `DecodeCropTokenize`, the grain transform
that turns a prepared record into model inputs, draws the same crop box from the image header and decodes a JPEG
only at the DCT scale (1/1, 1/2, 1/4, 1/8) that box needs (`load_rgb`, `jpeg_denominator`; docs/speed.md,
"Loader cost per sample").
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import io
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain.python as grain
import numpy as np
from PIL import Image

from mmjax import storage
from mmjax.data.image import center_crop_box, jpeg_denominator, random_crop_box, resize_box
from mmjax.errors import MmjaxError, RuntimeFault

BAD_KINDS = ('missing_file', 'empty_image', 'too_many_pixels', 'bad_image', 'tiny_image', 'empty_caption',
             'bad_caption', 'long_caption')


class BadSample(Exception):
    """One sample is unusable; `kind` is one of BAD_KINDS."""

    def __init__(self, kind: str, detail: str = ''):
        if kind not in BAD_KINDS:
            raise ValueError(f'unknown bad-sample kind {kind!r}; choose one of {BAD_KINDS}')
        super().__init__(f'{kind}: {detail}' if detail else kind)
        self.kind = kind
        self.detail = detail


class BadDataError(RuntimeFault, RuntimeError):
    """Too many bad samples in a shard / file, or a whole shard unreadable; the message names it."""


class DataSpecError(MmjaxError, ValueError):
    """A dataset spec (or a prepared dataset) that cannot be used as given; the message names what to change."""


class DataFileNotFoundError(DataSpecError, FileNotFoundError):
    """A dataset spec names files that do not exist."""


@dataclasses.dataclass(frozen=True)
class DecodeLimits:
    """Thresholds of the decode stage.

    max_pixels: largest width * height accepted (default 8,192 x 8,192 = 67 M); compared with the header.
    min_side: smallest accepted height / width.
    max_caption_chars: longest caption (characters, after stripping) accepted.
    max_bad_fraction: the most bad samples a shard / file may hold, as a fraction of its samples
        (`DecodeStats.check`).
    min_samples_for_fraction: for a stream without file ends (`mmjax.data.stream`): its running fraction is
        judged once this many samples were read. Prepared datasets judge each file at its end instead.
    """

    max_pixels: int = 8192 * 8192
    min_side: int = 1
    max_caption_chars: int = 2000
    max_bad_fraction: float = 0.1
    min_samples_for_fraction: int = 100

    def __post_init__(self):
        if self.max_pixels <= 0 or self.min_side < 1 or self.max_caption_chars <= 0:
            raise DataSpecError(f'DecodeLimits needs positive max_pixels, min_side and max_caption_chars: {self}')
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise DataSpecError(f'DecodeLimits.max_bad_fraction={self.max_bad_fraction} must be in [0, 1]')

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> DecodeLimits:
        """From a dict (e.g. a dataset spec's 'limits'); unknown keys raise ValueError."""
        values = dict(values or {})
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise DataSpecError(f'unknown decode limits {sorted(unknown)}; known: '
                             f'{[f.name for f in dataclasses.fields(cls)]}')
        return cls(**values)


class DecodeStats:
    """Counts of samples seen, kept and skipped by kind (one object per split / shard / worker; add with `+`)."""

    def __init__(self):
        self.seen = 0
        self.kept = 0
        self.skipped: collections.Counter = collections.Counter()

    def ok(self) -> None:
        self.seen += 1
        self.kept += 1

    def bad(self, kind: str) -> None:
        if kind not in BAD_KINDS:
            raise ValueError(f'unknown bad-sample kind {kind!r}')
        self.seen += 1
        self.skipped[kind] += 1

    @property
    def num_bad(self) -> int:
        return sum(self.skipped.values())

    @property
    def bad_fraction(self) -> float:
        return self.num_bad / self.seen if self.seen else 0.0

    def update(self, other: DecodeStats) -> DecodeStats:
        self.seen += other.seen
        self.kept += other.kept
        self.skipped.update(other.skipped)
        return self

    def __add__(self, other: DecodeStats) -> DecodeStats:
        return DecodeStats().update(self).update(other)

    def check(self, where: str, limits: DecodeLimits, final: bool = False, total: int | None = None) -> None:
        """Raises BadDataError naming `where` (one shard / file) when its bad fraction is over the limit.

        `final` (the file was read to its end): judged on everything seen; nothing kept out of something seen
        also raises. Before the end, it raises only when the file's length `total` is known and the bad samples
        seen so far already exceed `max_bad_fraction` of it, so that no rest of the file could bring it back
        under the limit; a file whose bad samples come first but that ends under the limit passes."""
        if not self.seen:
            return
        limit = limits.max_bad_fraction
        if final and not self.kept:
            raise BadDataError(f'{where}: all {self.seen} samples are bad ({self.summary()}); fix or drop the file')
        if final and self.bad_fraction > limit:
            raise BadDataError(f'{where}: {self.num_bad}/{self.seen} samples bad ({self.bad_fraction:.1%} > '
                               f'max_bad_fraction={limit:.1%}): {self.summary()}; fix or drop the file, or raise '
                               f"the spec's limits.max_bad_fraction")
        if not final and total and self.num_bad / total > limit:
            raise BadDataError(f'{where}: {self.num_bad} bad samples in the first {self.seen} of its {total}, over '
                               f'max_bad_fraction={limit:.1%} of the file whatever the rest holds (stopped early): '
                               f"{self.summary()}; fix or drop the file, or raise the spec's limits.max_bad_fraction")

    def summary(self) -> str:
        kinds = ', '.join(f'{k}={v}' for k, v in sorted(self.skipped.items()) if v)
        return f'seen={self.seen} kept={self.kept}' + (f' skipped: {kinds}' if kinds else '')

    def metrics(self, prefix: str = 'data/') -> dict[str, float]:
        """Flat scalars: {prefix}seen, kept, bad_fraction and skipped_<kind> for every kind (zeros included)."""
        out = {f'{prefix}seen': float(self.seen), f'{prefix}kept': float(self.kept),
               f'{prefix}bad_fraction': float(self.bad_fraction)}
        out.update({f'{prefix}skipped_{k}': float(self.skipped.get(k, 0)) for k in BAD_KINDS})
        return out

    def to_dict(self) -> dict[str, Any]:
        return {'seen': self.seen, 'kept': self.kept, 'skipped': {k: int(v) for k, v in self.skipped.items() if v}}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> DecodeStats:
        stats = cls()
        stats.seen, stats.kept = int(values['seen']), int(values['kept'])
        stats.skipped.update({k: int(v) for k, v in values.get('skipped', {}).items()})
        return stats

    def __repr__(self) -> str:
        return f'DecodeStats({self.summary()})'


def _open_checked(data: bytes, limits: DecodeLimits) -> Image.Image:
    """Lazily opened PIL image whose header passed the size checks (no pixel decoded yet)."""
    if data is None or len(data) == 0:
        raise BadSample('empty_image', 'zero bytes')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # bomb warnings (we check sizes ourselves), corrupt-EXIF/TIFF-tag noise
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as error:
            raise BadSample('too_many_pixels', str(error)) from None
        except Exception as error:  # PIL raises UnidentifiedImageError, SyntaxError, ValueError, struct.error ...
            raise BadSample('bad_image', f'{type(error).__name__}: {error}') from None
    width, height = image.size
    if width * height > limits.max_pixels:
        raise BadSample('too_many_pixels', f'{width}x{height} > max_pixels={limits.max_pixels}')
    if min(width, height) < limits.min_side:
        raise BadSample('tiny_image', f'{width}x{height} < min_side={limits.min_side}')
    return image


def open_image(data: bytes, limits: DecodeLimits = DecodeLimits()) -> Image.Image:
    """Encoded bytes -> lazily opened PIL image whose header passed the size checks (no pixel decoded yet;
    `.size` is the stored width x height). Raises BadSample."""
    return _open_checked(data, limits)


def load_rgb(image: Image.Image, denominator: int = 1) -> tuple[Image.Image, int]:
    """Fully decodes a lazily opened image (truncated / corrupt data fails here) to an RGB PIL image (gray,
    palette, CMYK, alpha converted; 16-bit gray keeps its high byte). Raises BadSample.

    denominator: for a JPEG, decode at 1/denominator (1, 2, 4 or 8) of the stored size with libjpeg's DCT
    scaling (ceil(W / d) x ceil(H / d) pixels); ignored for other formats. Returns (image, the denominator
    actually applied: 1 when the format cannot be scaled)."""
    applied = 1
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        try:
            if denominator > 1 and image.format == 'JPEG':
                width, height = image.size
                # PIL picks the largest power-of-two scale with both sides >= the requested size: exactly d here.
                drafted = image.draft('RGB', (width // denominator, height // denominator))
                applied = int(round(width / drafted[1][2])) if drafted else 1
            image.load()
            if image.mode.startswith('I;16') or image.mode == 'I':  # 16-bit gray: keep the high byte
                gray = (np.asarray(image).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8)
                image = Image.fromarray(gray, mode='L')
            if image.mode != 'RGB':
                image = image.convert('RGB')
        except BadSample:
            raise
        except Exception as error:  # OSError (truncated), ValueError, SyntaxError, struct.error, MemoryError ...
            raise BadSample('bad_image', f'{type(error).__name__}: {error}') from None
    return image, applied


def decode_image(data: bytes, limits: DecodeLimits = DecodeLimits(), draft_size: int | None = None) -> np.ndarray:
    """Encoded image bytes -> uint8 [H,W,3] RGB (gray, palette, CMYK, alpha converted). Raises BadSample.

    draft_size: for JPEG, let the decoder downscale by a power of two while both sides stay >= draft_size.
    (The training crop does not use it: `DecodeCropTokenize` scales by what its crop box needs instead.)
    """
    image = _open_checked(data, limits)
    denominator = 1
    if draft_size:
        width, height = image.size
        denominator = jpeg_denominator((0, 0, width, height), draft_size)
    image, _ = load_rgb(image, denominator)
    try:
        array = np.asarray(image)
    except Exception as error:  # MemoryError ...
        raise BadSample('bad_image', f'{type(error).__name__}: {error}') from None
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
        raise BadSample('bad_image', f'decoded to {array.dtype} {array.shape}')
    return array


def clean_caption(caption: Any, limits: DecodeLimits = DecodeLimits()) -> str:
    """A caption (str or bytes) -> stripped str with internal whitespace collapsed. Raises BadSample."""
    if caption is None:
        raise BadSample('empty_caption', 'no caption')
    if isinstance(caption, (bytes, bytearray, np.bytes_)):
        try:
            caption = bytes(caption).decode('utf-8')
        except UnicodeDecodeError as error:
            raise BadSample('bad_caption', f'not UTF-8: {error}') from None
    if not isinstance(caption, str):
        raise BadSample('bad_caption', f'caption of type {type(caption).__name__}')
    if '\x00' in caption or '\ufffd' in caption:
        raise BadSample('bad_caption', 'NUL or replacement character')
    text = ' '.join(caption.split())
    if not text:
        raise BadSample('empty_caption', 'blank caption')
    if len(text) > limits.max_caption_chars:
        raise BadSample('long_caption', f'{len(text)} chars > max_caption_chars={limits.max_caption_chars}')
    return text


def check_sample(image_bytes: bytes, captions: Sequence[Any], limits: DecodeLimits = DecodeLimits()
                 ) -> list[str]:
    """Prepare-time validation: fully decodes the image and cleans the captions.

    Returns the clean captions (bad ones among several are dropped; the sample is bad only if none is left,
    with the kind of the first bad caption). Raises BadSample.
    """
    decode_image(image_bytes, limits)
    clean, first_error = [], None
    for caption in captions:
        try:
            clean.append(clean_caption(caption, limits))
        except BadSample as error:
            first_error = first_error or error
    if not clean:
        raise first_error or BadSample('empty_caption', 'no caption')
    return clean


def read_file(path: str) -> bytes:
    """Bytes of `path`; a missing / unreadable file raises BadSample('missing_file')."""
    try:
        return storage.read_bytes(path)  # a local file or a gs:// / s3:// URL
    except OSError as error:
        raise BadSample('missing_file', f'{path}: {error.strerror or error}') from None


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, size: int,
                        scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                        flip: bool = True) -> np.ndarray:
    """Inception-style crop of decoded pixels: `random_crop_box` (area fraction ~ U(scale), log aspect ~
    U(log ratio)), resized (bicubic) to [size, size], then a horizontal flip with probability 1/2 when `flip`.

    image: uint8 [H,W,C]. Returns uint8 [size,size,C]. The reference of the training crop: `DecodeCropTokenize`
    draws the same box from the same rng but decodes a JPEG only at the DCT scale the box needs.
    """
    height, width = image.shape[:2]
    box = random_crop_box(width, height, rng, scale, ratio)
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    out = resize_box(pil, box, size)
    if flip and rng.random() < 0.5:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    out = np.asarray(out)
    return out[..., None] if out.ndim == 2 else out


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 [..., C] -> float32 (x / 255 - mean) / std, per channel (mean / std: C entries, or 1 for all).

    A lookup of the 256 values per channel, computed with that float32 arithmetic: equal bit for bit to it."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        return _normalize_arithmetic(image, mean, std)
    channels = image.shape[-1]
    table = _normalize_table(tuple(float(v) for v in np.ravel(mean)), tuple(float(v) for v in np.ravel(std)),
                             channels)
    out = np.empty(image.shape, np.float32)
    for c in range(channels):
        np.take(table[c], image[..., c], out=out[..., c], mode='clip')  # uint8 indices are always in range
    return out


def _normalize_arithmetic(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    mean = np.asarray(mean, np.float32)
    inv_std = 1.0 / np.asarray(std, np.float32)
    return (image.astype(np.float32) * np.float32(1 / 255) - mean) * inv_std


@functools.lru_cache(maxsize=64)
def _normalize_table(mean: tuple[float, ...], std: tuple[float, ...], channels: int) -> np.ndarray:
    """float32 [channels, 256]: row c is `_normalize_arithmetic` of the values 0..255 in channel c."""
    values = np.repeat(np.arange(256, dtype=np.uint8)[:, None], channels, axis=1)
    table = np.ascontiguousarray(_normalize_arithmetic(values, mean, std).T)
    table.setflags(write=False)
    return table


@dataclasses.dataclass(frozen=True)
class DecodeCropTokenize(grain.RandomMapTransform):
    """grain RandomMapTransform for captioned records (mmjax/data/builders.py):
    {'image': encoded bytes, 'captions': [bytes], ...}
    -> {'image': float32 [size,size,channels], 'text': int32 [L], 'label': int32 -1}.

    One caption drawn uniformly per example per epoch; `train` = random crop box (`random_crop_box`) + flip,
    else the central max-square box; the box is chosen in stored-image pixels from the header, then a JPEG is
    decoded at the smallest DCT scale at which the box still spans >= size pixels both ways
    (`jpeg_denominator`, `load_rgb`), so the one bicubic resize never upsamples more than from a full decode;
    other formats are decoded in full. The rng draws (caption, box, flip) are those of a full decode +
    `random_resized_crop`, and so is the output up to the small pixel differences of DCT scaling
    (tests/test_decode.py states the tolerance). Records were validated at prepare time, so a decode failure
    here means the files changed or `limits` is stricter than at prepare time: it raises BadSample naming the
    record key (the pipeline maps stream positions to records by index arithmetic and cannot skip).
    """

    tokenizer: Any
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train: bool = True
    scale: tuple[float, float] = (0.08, 1.0)
    limits: DecodeLimits = DecodeLimits()
    channels: int = 3  # 1: ITU-R 601 luma (mean / std then have one entry)

    def random_map(self, record: Mapping[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        return self.staged_map(record, rng)

    def staged_map(self, record: Mapping[str, Any], rng: np.random.Generator,
                   lap: Callable[[str], None] = lambda stage: None) -> dict[str, np.ndarray]:
        """`random_map`, calling `lap(stage)` after each of STAGES (the loader benchmark's per-stage timer)."""
        try:
            image = open_image(record['image'], self.limits)
            captions = list(record['captions'])
            caption = captions[int(rng.integers(len(captions)))]
            width, height = image.size
            box = random_crop_box(width, height, rng, self.scale) if self.train else center_crop_box(width, height)
            image, denominator = load_rgb(image, jpeg_denominator(box, self.size))
        except BadSample as bad:
            raise BadSample(bad.kind, f"record {record.get('key')!r}: {bad.detail}") from None
        lap('decode')
        image = resize_box(image, box, self.size, denominator)
        if self.train and rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        if self.channels == 1:
            image = image.convert('L')
        pixels = np.asarray(image)
        lap('crop_resize')
        pixels = normalize(pixels[..., None] if pixels.ndim == 2 else pixels, self.mean, self.std)
        lap('normalise')
        caption = caption.decode('utf-8') if isinstance(caption, (bytes, np.bytes_)) else str(caption)
        text = self.tokenizer.encode([caption])[0]
        lap('tokenise')
        return {'image': pixels, 'text': text, 'label': np.int32(-1)}


STAGES = ('decode', 'crop_resize', 'normalise', 'tokenise')  # DecodeCropTokenize.staged_map's laps, in order
