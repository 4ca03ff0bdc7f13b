"""TFDS array_record builders for image-text data at scale, built from a small dict spec.

Formats (`spec['format']`):
  'webdataset'  img2dataset / webdataset tar shards: members `{key}.jpg|jpeg|png|webp` + `{key}.txt`
                (+ optional `{key}.json`, whose 'caption' is used when the .txt is absent). Read shard by
                shard, members of one key consecutive (the webdataset convention).
  'csv'         CSV / TSV (delimiter from the extension, or `spec['delimiter']`) with an image-path column
                (`image_column`, default 'filepath') and one or more caption columns (`caption_column`,
                default 'caption'; a list keeps several captions). Relative paths are resolved against the
                CSV file's folder (or `spec['image_root']`).
  'coco'        COCO-captions JSON ({'images': [{id, file_name}], 'annotations': [{image_id, caption}]}); all
                captions of an image are kept as a list. Image paths relative to `spec['image_root']`
                (default: the JSON's folder).

Spec: {'name': 'my_pairs', 'format': 'webdataset', 'splits': {'train': ['a/*.tar'], 'test': 'b.tar'},
       ... format keys ..., 'limits': {DecodeLimits fields}}. `'paths': ...` is short for {'train': ...}.

Records (read with `load_source(name, data_dir, split)`): {'image': encoded bytes (JPEG/PNG/WebP as found),
'captions': list of bytes (UTF-8, cleaned), 'key': bytes, 'index': int64 position in the split order}.

Bad samples are filtered at PREPARE time with `mmjax.data.decode.check_sample` (a full decode): the grain
pipeline maps global stream positions to records by index arithmetic, so it cannot skip records at read time
without changing batches across process counts; and a bad sample then costs its decode once, not every epoch.
Counts by kind are saved as `decode_stats.json` beside the dataset (`load_stats`). A shard / file with more
than `max_bad_fraction` bad samples, or unreadable as a whole, raises `BadDataError` naming it. The fraction is
judged per file at its end; a file whose length is known (CSV rows, COCO images, the members of an uncompressed
tar) stops early once its bad samples alone exceed the limit of its whole length. A CSV field longer than the csv
module's limit is read whole (up to `CSV_FIELD_LIMIT`) and counted as `long_caption`.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import hashlib
import json
import os
import sys
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from tqdm.auto import tqdm

from mmjax.data.decode import (
    BadDataError,
    BadSample,
    DataFileNotFoundError,
    DataSpecError,
    DecodeLimits,
    DecodeStats,
    check_sample,
    read_file,
)
from mmjax.data.locking import file_lock

FORMATS = ('webdataset', 'csv', 'coco')
IMAGE_EXTENSIONS = ('jpg', 'jpeg', 'png', 'webp')
VERSION = '1.0.0'
STATS_FILE = 'decode_stats.json'
# Python's csv module refuses fields over 131,072 characters. A longer caption (a scraped page dump) is read whole
# and counted as `long_caption` by the caption rule; a field over this limit (an unbalanced quote swallowing the
# rest of the file, say) is counted as `long_caption` too, and the reader goes on at the next line.
CSV_FIELD_LIMIT = 1 << 24


# --------------------------------------------------------------------------------------------------- readers
# Each reader yields (where, key, image_bytes | BadSample, captions) for one source file / shard, where a
# BadSample stands for a sample whose image is missing.

def _split_member(name: str) -> tuple[str, str]:
    """'dir/000123.jpg' -> ('dir/000123', 'jpg'): key = path up to the first dot of the basename."""
    folder, base = os.path.split(name)
    stem, _, ext = base.partition('.')
    return os.path.join(folder, stem), ext.lower()


def webdataset_sample(path: str, key: str, parts: dict[str, bytes]) -> tuple[str, bytes | BadSample, list[Any]]:
    """One webdataset sample from its tar members {extension: bytes}: (key, image bytes or BadSample('missing_file'),
    captions from `.txt`, else the `caption` of `.json`)."""
    image = next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), None)
    captions: list[Any] = [parts['txt']] if 'txt' in parts else []
    if not captions and 'json' in parts:
        try:
            meta = json.loads(parts['json'])
            if isinstance(meta, dict) and meta.get('caption') is not None:
                captions = [meta['caption']]
        except ValueError:
            pass
    if image is None:
        image = BadSample('missing_file', f'{path}: no image member for key {key!r}')
    return key, image, captions


def iter_webdataset_shard(path: str) -> Iterator[tuple[str, bytes | BadSample, list[Any]]]:
    """(key, image bytes | BadSample, captions) per sample of one tar shard. Raises BadDataError naming the
    shard if it cannot be opened or read through."""
    def emit(key, parts):
        return webdataset_sample(path, key, parts)

    try:
        with tarfile.open(path, 'r:*') as tar:
            key, parts = None, {}
            for member in tar:
                if not member.isfile():
                    continue
                member_key, ext = _split_member(member.name)
                if member_key != key:
                    if key is not None and parts:
                        yield emit(key, parts)
                    key, parts = member_key, {}
                handle = tar.extractfile(member)
                parts[ext] = handle.read() if handle is not None else b''
            if key is not None and parts:
                yield emit(key, parts)
    except (tarfile.TarError, EOFError, OSError, ValueError) as error:
        raise BadDataError(f'webdataset shard {path} is unreadable: {type(error).__name__}: {error}') from None


def iter_csv(path: str, image_column: str = 'filepath', caption_column: str | Sequence[str] = 'caption',
             delimiter: str | None = None, image_root: str | None = None
             ) -> Iterator[tuple[str, bytes | BadSample, list[Any]]]:
    """(row key, image bytes | BadSample('missing_file'), captions) per row of a CSV / TSV file."""
    if delimiter is None:
        delimiter = '\t' if path.lower().endswith(('.tsv', '.tab')) else ','
    columns = [caption_column] if isinstance(caption_column, str) else list(caption_column)
    root = image_root or os.path.dirname(os.path.abspath(path))
    try:
        handle = open(path, newline='', encoding='utf-8', errors='surrogateescape')
    except OSError as error:
        raise BadDataError(f'CSV file {path} is unreadable: {error}') from None
    _raise_csv_field_limit()
    with handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        missing = [c for c in [image_column, *columns] if c not in (reader.fieldnames or [])]
        if missing:
            raise BadDataError(f'CSV file {path} lacks columns {missing}; it has {reader.fieldnames}')
        for row_number, row in enumerate(_csv_rows(reader, path)):
            if isinstance(row, BadSample):
                yield str(row_number), row, []
                continue
            image_path = (row[image_column] or '').strip()
            captions = [_undo_surrogates(row[c]) for c in columns if row[c] is not None]
            if not image_path:
                yield str(row_number), BadSample('missing_file', f'{path} row {row_number}: empty path'), captions
                continue
            full = image_path if os.path.isabs(image_path) else os.path.join(root, image_path)
            try:
                image = read_file(full)
            except BadSample as bad:
                image = bad
            yield str(row_number), image, captions


def _raise_csv_field_limit() -> None:
    if csv.field_size_limit() < CSV_FIELD_LIMIT:
        csv.field_size_limit(CSV_FIELD_LIMIT)  # process-wide; only ever raised


def _csv_rows(reader: csv.DictReader, path: str) -> Iterator[dict[str, Any] | BadSample]:
    """The rows of `reader`; a row with a field over the csv module's limit comes as BadSample('long_caption')
    (the reader goes on at the next line). Any other CSV error raises BadDataError naming the file and line."""
    while True:
        try:
            yield next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            line = reader.reader.line_num  # the DictReader's own count is that of its last good row
            if 'field larger than field limit' not in str(error):
                raise BadDataError(f'CSV file {path} line {line} is malformed ({error}); fix the file') from None
            yield BadSample('long_caption', f'{path} line {line}: a field over {csv.field_size_limit()} characters')


def _count_csv_rows(path: str, delimiter: str | None) -> int | None:
    """The number of rows of a CSV / TSV file (a fast pass without reading images), or None if it is unreadable."""
    if delimiter is None:
        delimiter = '\t' if path.lower().endswith(('.tsv', '.tab')) else ','
    _raise_csv_field_limit()
    try:
        with open(path, newline='', encoding='utf-8', errors='surrogateescape') as handle:
            reader = csv.DictReader(handle, delimiter=delimiter)
            count = 0
            for _ in _csv_rows(reader, path):
                count += 1
            return count
    except (OSError, BadDataError):
        return None


def _count_tar_samples(path: str) -> int | None:
    """The number of samples (keys) of an uncompressed tar shard from its member headers alone, or None (a
    compressed or unreadable shard: then it is judged at its end only)."""
    try:
        with tarfile.open(path, 'r:') as tar:
            keys = [_split_member(m.name)[0] for m in tar if m.isfile()]
    except (tarfile.TarError, EOFError, OSError, ValueError):
        return None
    return sum(1 for i, key in enumerate(keys) if i == 0 or key != keys[i - 1])


def _undo_surrogates(text: str) -> str | bytes:
    """A CSV cell read with errors='surrogateescape': its bytes when it was not valid UTF-8, else the str."""
    try:
        text.encode('utf-8')
        return text
    except UnicodeEncodeError:
        return text.encode('utf-8', errors='surrogateescape')


def _read_coco(path: str) -> tuple[list[dict], list[dict]]:
    try:
        with open(path, 'rb') as handle:
            data = json.load(handle)
        return data['images'], data['annotations']
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise BadDataError(f'COCO captions file {path} is unreadable: {type(error).__name__}: {error}') from None


def iter_coco(path: str, image_root: str | None = None, data: tuple[list[dict], list[dict]] | None = None
              ) -> Iterator[tuple[str, bytes | BadSample, list[Any]]]:
    """(image id, image bytes | BadSample, all captions of the image) per image of a COCO-captions JSON
    (`data`: its (images, annotations) when already read)."""
    images, annotations = data if data is not None else _read_coco(path)
    root = image_root or os.path.dirname(os.path.abspath(path))
    captions: dict[Any, list[Any]] = {}
    for annotation in annotations:
        captions.setdefault(annotation['image_id'], []).append(annotation.get('caption'))
    for image in sorted(images, key=lambda im: str(im['id'])):
        full = os.path.join(root, image['file_name'])
        try:
            content = read_file(full)
        except BadSample as bad:
            content = bad
        yield str(image['id']), content, captions.get(image['id'], [])


# --------------------------------------------------------------------------------------------------- spec

def _expand(paths: str | Sequence[str], base: str | None) -> list[str]:
    """Glob patterns / paths -> sorted existing files; a pattern matching nothing raises FileNotFoundError."""
    out = []
    for pattern in [paths] if isinstance(paths, str) else list(paths):
        pattern = os.path.expanduser(pattern)
        if base and not os.path.isabs(pattern):
            pattern = os.path.join(base, pattern)
        matches = sorted(glob.glob(pattern))
        if not matches:
            raise DataFileNotFoundError(f'dataset spec: no file matches {pattern!r}; check the path (a relative one '
                                        f'is read from the spec file\'s folder, or the current folder)')
        out.extend(matches)
    return out


def normalize_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Validated copy of a dataset spec with 'splits' as {split: [absolute files]}."""
    spec = dict(spec)
    for required in ('name', 'format'):
        if required not in spec:
            raise DataSpecError(f'dataset spec needs {required!r}: {spec}')
    if spec['format'] not in FORMATS:
        raise DataSpecError(f"dataset spec format={spec['format']!r}; choose one of {FORMATS}")
    name = spec['name']
    if not isinstance(name, str) or not name.replace('_', '').isalnum() or not name[0].isalpha() \
            or name != name.lower():
        raise DataSpecError(f'dataset spec name={name!r} must be lower_snake_case (letters, digits, _)')
    if 'paths' in spec:
        if 'splits' in spec:
            raise DataSpecError("dataset spec: give 'paths' (the train split) or 'splits', not both")
        spec['splits'] = {'train': spec.pop('paths')}
    if not spec.get('splits'):
        raise DataSpecError(f"dataset spec needs 'splits' ({{split: paths}}) or 'paths': {spec}")
    base = spec.get('base_dir')
    spec['splits'] = {split: [os.path.abspath(p) for p in _expand(paths, base)]
                      for split, paths in spec['splits'].items()}
    spec['limits'] = dataclasses.asdict(DecodeLimits.from_mapping(spec.get('limits')))
    known = {'name', 'format', 'splits', 'base_dir', 'limits', 'image_column', 'caption_column', 'delimiter',
             'image_root', 'description'}
    unknown = set(spec) - known
    if unknown:
        raise DataSpecError(f'dataset spec has unknown keys {sorted(unknown)}; known: {sorted(known)}')
    return spec


def _open_source(spec: Mapping[str, Any], path: str) -> tuple[int | None, Iterator]:
    """(the file's number of samples when it can be known cheaply, else None; its reader)."""
    fmt = spec['format']
    if fmt == 'webdataset':
        return _count_tar_samples(path), iter_webdataset_shard(path)
    if fmt == 'csv':
        return _count_csv_rows(path, spec.get('delimiter')), iter_csv(
            path, spec.get('image_column', 'filepath'), spec.get('caption_column', 'caption'), spec.get('delimiter'),
            spec.get('image_root'))
    data = _read_coco(path)
    return len(data[0]), iter_coco(path, spec.get('image_root'), data)


# --------------------------------------------------------------------------------------------------- builder

class _CaptionsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Image-text pairs from a spec (set as the class attribute SPEC by `builder_class`). Not in TFDS's registry
    (nor are its subclasses): prepared datasets are read back from their folder by `load_source`."""

    VERSION = tfds.core.Version(VERSION)
    SPEC: dict[str, Any] = {}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # No checksums file to look up next to the code (see mmjax/data/digits.py).
        return None

    def __init__(self, *args, progress: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.progress = progress
        self.stats: dict[str, DecodeStats] = {}

    def _info(self) -> tfds.core.DatasetInfo:
        spec = self.SPEC
        return tfds.core.DatasetInfo(
            builder=self,
            description=spec.get('description') or f"{spec['format']} image-text pairs",
            features=tfds.features.FeaturesDict({
                # Encoded bytes as found (never a numpy array: TFDS would call TensorFlow to encode it).
                'image': tfds.features.Image(shape=(None, None, 3)),
                'captions': tfds.features.Sequence(tfds.features.Text()),
                'key': tfds.features.Text(),
                'index': np.int64,
            }),
        )

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split, files) for split, files in self.SPEC['splits'].items()}

    def _generate_examples(self, split: str, files: list[str]):
        limits = DecodeLimits.from_mapping(self.SPEC['limits'])
        total = self.stats.setdefault(split, DecodeStats())
        index = 0
        bar = tqdm(files, desc=f"{self.SPEC['name']}/{split}", unit='file', disable=not self.progress,
                   file=sys.stderr)
        for file_number, path in enumerate(bar):
            stats = DecodeStats()
            where = f"{self.SPEC['format']} file {path}"
            length, samples = _open_source(self.SPEC, path)
            for key, image, captions in samples:
                try:
                    if isinstance(image, BadSample):
                        raise image
                    clean = check_sample(image, captions, limits)
                except BadSample as bad:
                    stats.bad(bad.kind)
                    stats.check(where, limits, total=length)  # early only once the file cannot recover
                    continue
                stats.ok()
                yield f'{file_number}/{key}', {'image': image, 'captions': clean, 'key': key, 'index': index}
                index += 1
            stats.check(where, limits, final=True)
            total.update(stats)
            bar.set_postfix(kept=total.kept, bad=total.num_bad)


def builder_class(spec: Mapping[str, Any]) -> type:
    """A GeneratorBasedBuilder subclass named spec['name'] for a normalised spec (not put in TFDS's registry)."""
    with tfds.core.registered.skip_registration():
        return type(f"Builder_{spec['name']}", (_CaptionsBuilder,), {'name': spec['name'], 'SPEC': dict(spec)})


def dataset_dir(name: str, data_dir: str) -> str:
    return os.path.join(os.path.abspath(os.path.expanduser(data_dir)), name, VERSION)


def is_prepared(name: str, data_dir: str) -> bool:
    return os.path.isfile(os.path.join(dataset_dir(name, data_dir), 'dataset_info.json'))


def _spec_fingerprint(spec: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def prepare_dataset(spec: Mapping[str, Any], data_dir: str, progress: bool = True) -> dict[str, DecodeStats]:
    """Builds `spec` into `data_dir/<name>/1.0.0/` (array_record) unless already prepared; returns the decode
    stats per split (loaded from `decode_stats.json` when reused).

    Reuse is by name: a prepared dataset of the same name built from a different spec raises DataSpecError (a
    ValueError: delete the folder or choose another name). Safe against concurrent callers (file lock).
    Raises BadDataError (naming the file) for unreadable shards or too many bad samples.
    """
    spec = normalize_spec(spec)
    name, fingerprint = spec['name'], _spec_fingerprint(spec)
    data_dir = os.path.abspath(os.path.expanduser(data_dir))
    os.makedirs(data_dir, exist_ok=True)
    with file_lock(os.path.join(data_dir, f'.{name}.lock')):
        if not is_prepared(name, data_dir):
            builder = builder_class(spec)(data_dir=data_dir, file_format='array_record', progress=progress)
            tfds.display_progress_bar(progress)
            try:
                builder.download_and_prepare()
            finally:
                tfds.display_progress_bar(True)
            payload = {'fingerprint': fingerprint, 'spec': spec,
                       'splits': {s: st.to_dict() for s, st in builder.stats.items()}}
            with open(os.path.join(dataset_dir(name, data_dir), STATS_FILE), 'w') as handle:
                json.dump(payload, handle, indent=1)
    stored = _read_stats_file(name, data_dir)
    if stored.get('fingerprint') != fingerprint:
        raise DataSpecError(f'{dataset_dir(name, data_dir)} was prepared from a different spec; delete it or use '
                         f'another name (stored spec: {stored.get("spec")})')
    return load_stats(name, data_dir)


def _read_stats_file(name: str, data_dir: str) -> dict[str, Any]:
    path = os.path.join(dataset_dir(name, data_dir), STATS_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path) as handle:
        return json.load(handle)


def load_stats(name: str, data_dir: str) -> dict[str, DecodeStats]:
    """Prepare-time decode stats per split of a prepared dataset ({} if none were saved)."""
    return {s: DecodeStats.from_dict(v) for s, v in _read_stats_file(name, data_dir).get('splits', {}).items()}


def load_source(name: str, data_dir: str, split: str = 'train'):
    """Random-access source (len, [i], __getitems__) of a prepared dataset, read from its folder alone (no
    spec, no registered builder). Records: {'image': encoded bytes, 'captions': array of bytes, 'key': bytes,
    'index': int64}."""
    folder = dataset_dir(name, data_dir)
    if not is_prepared(name, data_dir):
        raise DataFileNotFoundError(f'no prepared dataset {name!r} under {data_dir} (expected {folder}); run '
                                f'prepare_dataset(spec, data_dir) first')
    builder = tfds.builder_from_directory(folder)
    if split not in builder.info.splits:
        raise DataSpecError(f'dataset {name!r} has no split {split!r}; it has {sorted(builder.info.splits)}')
    return builder.as_data_source(split=split, decoders={'image': tfds.decode.SkipDecoding()})


def record_captions(record: Mapping[str, Any]) -> list[str]:
    """The record's captions as str."""
    return [c.decode('utf-8') if isinstance(c, (bytes, np.bytes_)) else str(c) for c in record['captions']]


def load_spec_file(path: str) -> dict[str, Any]:
    """A JSON spec file; relative paths in it are resolved against the file's folder."""
    with open(path) as handle:
        spec = json.load(handle)
    spec.setdefault('base_dir', os.path.dirname(os.path.abspath(path)))
    return spec


__all__ = ['BadDataError', 'FORMATS', 'builder_class', 'iter_coco', 'iter_csv',
           'iter_webdataset_shard', 'is_prepared', 'load_source', 'load_spec_file', 'load_stats',
           'normalize_spec', 'prepare_dataset', 'record_captions']
