"""TFDS array_record builders for image-text data at scale, built from a small dict spec.

Formats (`spec['format']`):
  'webdataset'  img2dataset / webdataset tar shards: members `{key}.jpg|jpeg|png|webp` + `{key}.txt` (+ optional
                `{key}.json`, whose 'caption' is used when the .txt is absent), members of one key consecutive.
  'csv'         CSV / TSV (delimiter from the extension, or `spec['delimiter']`) with an image-path column
                (`image_column`, default 'filepath') and caption columns (`caption_column`, default 'caption'; a
                list keeps several); relative paths from the CSV's folder (or `spec['image_root']`).
  'coco'        COCO-captions JSON ({'images': [{id, file_name}], 'annotations': [{image_id, caption}]}); all
                captions of an image kept; paths relative to `spec['image_root']` (default: the JSON's folder).
Spec: {'name': 'my_pairs', 'format': 'webdataset', 'splits': {'train': ['a/*.tar'], 'test': 'b.tar'},
       ... format keys ..., 'limits': {DecodeLimits fields}}. `'paths': ...` is short for {'train': ...}.

Every path (spec files, shard globs, CSV / COCO files, image files, `data_dir`) goes through `mmjax.storage`: local
or gs:// / s3:// URLs, except `data_dir`, local or gs:// (array_record's own file layer). Records (read with
`load_source(name, data_dir, split)`), stored in split order (files in order, then samples; TFDS's shuffle off):
{'image': encoded bytes (JPEG/PNG/WebP as found), 'captions': list of bytes (UTF-8, cleaned), 'key': bytes, 'index':
int64 position in the split}. `prepare_dataset(..., beam=...)` prepares the same records on Apache Beam.

Bad samples are filtered at PREPARE time with `mmjax.data.decode.check_sample` (a full decode): the grain pipeline
maps stream positions to records by index arithmetic, so it cannot skip records at read time without changing
batches across process counts. Counts by kind are saved as `decode_stats.json` beside the dataset (`load_stats`).
A file with more than `max_bad_fraction` bad samples, or unreadable, raises `BadDataError` naming it: judged at its
end, or early once its bad samples alone exceed the limit of its known length (CSV rows, COCO images, an
uncompressed local tar's members). A CSV field over the csv module's limit is read whole (to `CSV_FIELD_LIMIT`) and
counted as `long_caption`.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import writer as tfds_writer
from tqdm.auto import tqdm

from mmjax import storage
from mmjax.data import decode
from mmjax.data.decode import BadDataError, BadSample, DataSpecError, DecodeLimits, DecodeStats, check_sample
from mmjax.data.locking import file_lock
from mmjax.data.specs import load_spec_file

FORMATS = ('webdataset', 'csv', 'coco')
IMAGE_EXTENSIONS = ('jpg', 'jpeg', 'png', 'webp')
VERSION = '1.0.0'
STATS_FILE = 'decode_stats.json'
# The csv module refuses fields over 131,072 characters. A longer caption (a page dump) is read whole and counted as
# `long_caption`; so is a field over this limit (an unbalanced quote, say), and the reader goes on at the next line.
CSV_FIELD_LIMIT = 1 << 24


# --------------------------------------------------------------------------------------------------- readers
# Each reader yields (key, image bytes | BadSample (its image missing), captions) per sample of one file / shard.

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
    try:
        # Stream mode: one sequential read of the shard, also on an object store.
        with storage.open_file(path, 'rb') as handle, tarfile.open(fileobj=handle, mode='r|*') as tar:
            key, parts = None, {}
            for member in tar:
                if not member.isfile():
                    continue
                member_key, ext = _split_member(member.name)
                if member_key != key:
                    if key is not None and parts:
                        yield webdataset_sample(path, key, parts)
                    key, parts = member_key, {}
                member_file = tar.extractfile(member)
                parts[ext] = member_file.read() if member_file is not None else b''
            if key is not None and parts:
                yield webdataset_sample(path, key, parts)
    except (tarfile.TarError, EOFError, OSError, ValueError) as error:
        raise BadDataError(f'webdataset shard {path} is unreadable: {type(error).__name__}: {error}') from None


def _read_image(root: str, name: str) -> bytes | BadSample:
    """Image `name` of a CSV / COCO file (relative to `root` unless absolute or a URL), or BadSample('missing_file')."""
    path = name if storage.is_url(name) or os.path.isabs(name) else storage.join(root, name)
    try:
        return storage.read_bytes(path)
    except OSError as error:  # FileNotFoundError, PermissionError, IsADirectoryError, StorageError (a bad URL)
        return BadSample('missing_file', f'{path}: {getattr(error, "strerror", None) or error}')


def _open_text(path: str) -> io.TextIOWrapper:
    """A CSV file opened for the csv module (undecodable bytes kept as surrogates); raises OSError."""
    return io.TextIOWrapper(storage.open_file(path, 'rb'), encoding='utf-8', errors='surrogateescape', newline='')


def iter_csv(path: str, image_column: str = 'filepath', caption_column: str | Sequence[str] = 'caption',
             delimiter: str | None = None, image_root: str | None = None
             ) -> Iterator[tuple[str, bytes | BadSample, list[Any]]]:
    """(row key, image bytes | BadSample('missing_file'), captions) per row of a CSV / TSV file."""
    delimiter = delimiter or ('\t' if path.lower().endswith(('.tsv', '.tab')) else ',')
    columns = [caption_column] if isinstance(caption_column, str) else list(caption_column)
    root = image_root or storage.parent(storage.absolute(path))
    try:
        handle = _open_text(path)
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
            yield str(row_number), _read_image(root, image_path), captions


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
    delimiter = delimiter or ('\t' if path.lower().endswith(('.tsv', '.tab')) else ',')
    _raise_csv_field_limit()
    try:
        with _open_text(path) as handle:
            return sum(1 for _ in _csv_rows(csv.DictReader(handle, delimiter=delimiter), path))
    except (OSError, BadDataError):
        return None


def _count_tar_samples(path: str) -> int | None:
    """The number of samples (keys) of an uncompressed local tar shard from its member headers alone, or None (a
    compressed or unreadable shard, or one on an object store, where reading the headers spread over the shard would
    cost a second download of it: then it is judged at its end only)."""
    if storage.is_url(path):
        return None
    try:
        with storage.open_file(path, 'rb') as handle, tarfile.open(fileobj=handle, mode='r:') as tar:
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
        data = json.loads(storage.read_bytes(path))
        return data['images'], data['annotations']
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise BadDataError(f'COCO captions file {path} is unreadable: {type(error).__name__}: {error}') from None


def iter_coco(path: str, image_root: str | None = None, data: tuple[list[dict], list[dict]] | None = None
              ) -> Iterator[tuple[str, bytes | BadSample, list[Any]]]:
    """(image id, image bytes | BadSample, all captions of the image) per image of a COCO-captions JSON
    (`data`: its (images, annotations) when already read)."""
    images, annotations = data if data is not None else _read_coco(path)
    root = image_root or storage.parent(storage.absolute(path))
    captions: dict[Any, list[Any]] = {}
    for annotation in annotations:
        captions.setdefault(annotation['image_id'], []).append(annotation.get('caption'))
    for image in sorted(images, key=lambda im: str(im['id'])):
        yield str(image['id']), _read_image(root, image['file_name']), captions.get(image['id'], [])


# --------------------------------------------------------------------------------------------------- spec

def _expand(paths: str | Sequence[str], base: str | None) -> list[str]:
    """Glob patterns / paths -> sorted existing files; a pattern matching nothing raises FileNotFoundError."""
    out = []
    for pattern in [paths] if isinstance(paths, str) else list(paths):
        if not storage.is_url(storage.check(pattern)):
            pattern = os.path.expanduser(pattern)
            if base and not os.path.isabs(pattern):
                pattern = storage.join(base, pattern)
        matches = storage.glob(pattern)
        if not matches:
            raise decode.DataFileNotFoundError(f"dataset spec: no file matches {pattern!r}; check the path (a "
                                               "relative one is read from the spec file's folder, or the current one)")
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
    spec['splits'] = {split: [storage.absolute(p) for p in _expand(paths, base)]
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


def file_examples(spec: Mapping[str, Any], path: str, stats: DecodeStats) -> Iterator[dict[str, Any]]:
    """The kept samples of one file of a normalised spec in file order, as records without 'index' ({'image': bytes,
    'captions': [str], 'key': str}), each sample counted into `stats`; BadDataError (naming the file) when it is
    unreadable or its bad samples pass the limits. The per-file loop of the builder and of `mmjax.data.beam_prepare`."""
    limits = DecodeLimits.from_mapping(spec['limits'])
    where = f"{spec['format']} file {path}"
    length, samples = _open_source(spec, path)
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
        yield {'image': image, 'captions': clean, 'key': key}
    stats.check(where, limits, final=True)


# --------------------------------------------------------------------------------------------------- builder

class _ExampleWriter(tfds_writer.ExampleWriter):
    """TFDS's example writer (its hook for other storage), for shards on a bucket too: array_record's C++ writer
    opens local files only, so a gs:// shard is written to a local temporary file, then uploaded."""

    def write(self, path, examples):
        if not storage.is_url(os.fspath(path)):
            return super().write(path, examples)
        with tempfile.TemporaryDirectory(prefix='mmjax-shard-') as tmp:
            positions = super().write(local := os.path.join(tmp, 'shard'), examples)
            with open(local, 'rb') as source, storage.open_file(os.fspath(path), 'wb') as target:  # local: temporary
                shutil.copyfileobj(source, target, 1 << 24)  # local: from the temporary shard
        return positions


class _CaptionsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Image-text pairs from a spec (the class attribute SPEC, set by `builder_class`), outside TFDS's registry (read
    back from their folder by `load_source`). The TFDS key is the record's 'index' (shuffle off); `beam` (a
    `mmjax.data.beam_prepare.BeamPreparation`) gives each split's Beam transform instead of this process's loop."""

    VERSION = tfds.core.Version(VERSION)
    SPEC: dict[str, Any] = {}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # No checksums file to look up next to the code (see mmjax/data/digits.py).
        return None

    def __init__(self, *args, progress: bool = True, beam: Any = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.progress = progress
        self.beam = beam
        self.stats: dict[str, DecodeStats] = {}

    def _example_writer(self) -> _ExampleWriter:
        return _ExampleWriter(file_format=self.info.file_format)

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
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        splits = self.SPEC['splits'].items()
        if self.beam is not None:
            return {split: self.beam.split_transform(self.SPEC, split, files) for split, files in splits}
        return {split: self._generate_examples(split, files) for split, files in splits}

    def _generate_examples(self, split: str, files: list[str]):
        total = self.stats.setdefault(split, DecodeStats())
        index = 0
        bar = tqdm(files, desc=f"{self.SPEC['name']}/{split}", unit='file', disable=not self.progress,
                   file=sys.stderr)
        for path in bar:
            stats = DecodeStats()
            for example in file_examples(self.SPEC, path, stats):
                yield index, {**example, 'index': index}
                index += 1
            total.update(stats)
            bar.set_postfix(kept=total.kept, bad=total.num_bad)


def builder_class(spec: Mapping[str, Any]) -> type:
    """A GeneratorBasedBuilder subclass named spec['name'] for a normalised spec (not put in TFDS's registry)."""
    with tfds.core.registered.skip_registration():
        return type(f"Builder_{spec['name']}", (_CaptionsBuilder,), {'name': spec['name'], 'SPEC': dict(spec)})


def check_data_dir(data_dir: str) -> str:
    """`data_dir` made absolute (a URL as it is); s3:// raises DataSpecError (array_record knows local and gs://)."""
    data_dir = storage.absolute(data_dir)
    if storage.scheme(data_dir) == 's3':
        raise DataSpecError(f'data_dir {data_dir}: prepared datasets (array_record) can be written and read on a '
                            f'local disk or gs:// only, not s3://; use a local or gs:// data_dir')
    return data_dir


def dataset_dir(name: str, data_dir: str) -> str:
    return storage.join(storage.absolute(data_dir), name, VERSION)


def is_prepared(name: str, data_dir: str) -> bool:
    return storage.isfile(storage.join(dataset_dir(name, data_dir), 'dataset_info.json'))


def _spec_fingerprint(spec: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _lock_path(name: str, data_dir: str) -> str:
    """The lock of preparing `name`: in data_dir; for a bucket, a local file per bucket and name (this machine only)."""
    if not storage.is_url(data_dir):
        return os.path.join(data_dir, f'.{name}.lock')
    digest = hashlib.sha256(data_dir.split('/', 3)[2].encode()).hexdigest()[:16]  # gs://BUCKET/...
    return os.path.join(tempfile.gettempdir(), f'mmjax-{digest}.{name}.lock')


def prepare_dataset(spec: Mapping[str, Any], data_dir: str, progress: bool = True, beam: Any = None
                    ) -> dict[str, DecodeStats]:
    """Builds `spec` into `data_dir/<name>/1.0.0/` (array_record; data_dir local or gs://) unless already
    prepared; returns the decode stats per split (loaded from `decode_stats.json` when reused).

    beam: None prepares in this process; a `mmjax.data.beam_prepare.BeamPreparation` on Apache Beam, into the
    same records. Reuse is by name: a dataset of the same name prepared from another spec raises DataSpecError (a
    ValueError: delete the folder or choose another name). Safe against concurrent callers on one machine (a file
    lock). Raises BadDataError (naming the file) for unreadable shards or too many bad samples.
    """
    spec = normalize_spec(spec)
    name, fingerprint = spec['name'], _spec_fingerprint(spec)
    data_dir = check_data_dir(data_dir)
    storage.makedirs(data_dir)
    with file_lock(_lock_path(name, data_dir)):
        if not is_prepared(name, data_dir):
            builder = builder_class(spec)(data_dir=data_dir, file_format='array_record', progress=progress,
                                          beam=beam)
            tfds.display_progress_bar(progress)
            try:
                if beam is not None:
                    stats = beam.prepare(builder, data_dir)
                else:
                    builder.download_and_prepare()
                    stats = builder.stats
            finally:
                tfds.display_progress_bar(True)
            payload = {'fingerprint': fingerprint, 'spec': spec,
                       'splits': {s: st.to_dict() for s, st in stats.items()}}
            storage.write_text_atomic(storage.join(dataset_dir(name, data_dir), STATS_FILE),
                                      json.dumps(payload, indent=1))
    stored = _read_stats_file(name, data_dir)
    if stored.get('fingerprint') != fingerprint:
        raise DataSpecError(f'{dataset_dir(name, data_dir)} was prepared from a different spec; delete it or use '
                            f'another name (stored spec: {stored.get("spec")})')
    return load_stats(name, data_dir)


def _read_stats_file(name: str, data_dir: str) -> dict[str, Any]:
    path = storage.join(dataset_dir(name, data_dir), STATS_FILE)
    if not storage.isfile(path):
        return {}
    return json.loads(storage.read_text(path))


def load_stats(name: str, data_dir: str) -> dict[str, DecodeStats]:
    """Prepare-time decode stats per split of a prepared dataset ({} if none were saved)."""
    return {s: DecodeStats.from_dict(v) for s, v in _read_stats_file(name, data_dir).get('splits', {}).items()}


def load_source(name: str, data_dir: str, split: str = 'train'):
    """Random-access source (len, [i], __getitems__) of a prepared dataset, read from its folder alone (no
    spec, no registered builder). Records: {'image': encoded bytes, 'captions': array of bytes, 'key': bytes,
    'index': int64}."""
    folder = dataset_dir(name, check_data_dir(data_dir))
    if not is_prepared(name, data_dir):
        raise decode.DataFileNotFoundError(f'no prepared dataset {name!r} under {data_dir} (expected {folder}); '
                                           f'run prepare_dataset(spec, data_dir) first')
    builder = tfds.builder_from_directory(folder)
    if split not in builder.info.splits:
        raise DataSpecError(f'dataset {name!r} has no split {split!r}; it has {sorted(builder.info.splits)}')
    return builder.as_data_source(split=split, decoders={'image': tfds.decode.SkipDecoding()})


def record_captions(record: Mapping[str, Any]) -> list[str]:
    """The record's captions as str."""
    return [c.decode('utf-8') if isinstance(c, (bytes, np.bytes_)) else str(c) for c in record['captions']]


__all__ = ['BadDataError', 'FORMATS', 'builder_class', 'check_data_dir', 'file_examples', 'iter_coco', 'iter_csv',
           'iter_webdataset_shard', 'is_prepared', 'load_source', 'load_spec_file', 'load_stats', 'normalize_spec',
           'prepare_dataset', 'record_captions']
