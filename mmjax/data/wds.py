"""Webdataset / img2dataset tar shards read in place, for the streaming loader (mmjax/data/stream.py).

Every file goes through the path layer `mmjax.storage`, so a spec, its shard patterns and the shards themselves
may be local paths or object-store URLs (gs://, s3://: whatever gcsfs / s3fs reach with the object-store settings
present). Before anything is listed, the bucket of every URL is checked (`mmjax.storage.reachable`): a misspelled
or unreachable bucket is a one-line `StorageError` naming the path, raised while the config is checked, before
anything compiles.

The spec is the builder spec of mmjax/data/builders.py (format 'webdataset'; the same file serves both paths):

    {"name": "laion_part", "format": "webdataset", "paths": "shards/{00000..00099}.tar",
     "limits": {"max_bad_fraction": 0.1}}

`paths` (or `splits[train_split]`) is one pattern or a list; relative ones are read from the spec file's folder
(an inline JSON spec: the working directory, or `base_dir`), which may be a bucket's folder. A pattern may use
glob characters (`*`, `?`, `[...]`) and webdataset's brace ranges (`{00000..00099}`, zero-padded like the
bounds); each must match a shard.

A shard is read once, front to back, in tar streaming mode (`tarfile` mode 'r|*' over `storage.open_file`: an
object store serves it as one sequential read); members `{key}.jpg|jpeg|png|webp` + `{key}.txt` (or `{key}.json`
with a 'caption') of one key are consecutive, as in mmjax/data/builders.py's reader. A shard that is gone
(deleted after the run started), truncated or unreadable raises one of `SHARD_ERRORS` naming it; the stream
reports and skips it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import re
import tarfile
from collections.abc import Iterator
from typing import Any

from mmjax import storage
from mmjax.data.builders import webdataset_sample
from mmjax.data.decode import BadSample, DataFileNotFoundError, DataSpecError, DecodeLimits
from mmjax.data.specs import load_spec_file
from mmjax.errors import StorageError

SPEC_KEYS = {'name', 'format', 'paths', 'splits', 'base_dir', 'limits', 'description', 'image_column',
             'caption_column', 'delimiter', 'image_root'}
GLOB_CHARS = '*?['
BRACES = re.compile(r'\{(\d+)\.\.(\d+)\}')
# What reading a shard that is gone, truncated or unreachable raises (`iter_shard` turns an object-store client's
# own errors into StorageError, an OSError).
SHARD_ERRORS = (OSError, EOFError, tarfile.TarError, ValueError)


@dataclasses.dataclass(frozen=True)
class StreamSpec:
    """A webdataset spec resolved for streaming: its name, its shards (sorted; their positions are the shard ids
    of the iterator state) and its decode limits."""

    name: str
    shards: tuple[str, ...]
    limits: DecodeLimits


def read_spec(text: str) -> dict[str, Any]:
    """`data.spec` (a spec file path or URL, or an inline JSON object) -> the spec dict with 'base_dir' set.
    Raises StorageError (an unreachable bucket), DataFileNotFoundError, DataSpecError."""
    text = str(text).strip()
    if not text:
        raise DataSpecError("data.spec: give the webdataset spec (a JSON file, or an inline JSON object) for "
                            "data.name='wds_stream'")
    if not text.startswith('{'):
        try:
            return load_spec_file(text)
        except DataSpecError as error:  # DataFileNotFoundError too: the same kind, with the key named
            raise type(error)(f'data.spec: {error}') from None
    try:
        spec = json.loads(text)
    except ValueError as error:
        raise DataSpecError(f'data.spec: {text[:80]!r} is not valid JSON: {error}') from None
    if not isinstance(spec, dict):
        raise DataSpecError(f'data.spec: {text[:80]!r} must hold a JSON object, not {type(spec).__name__}')
    spec.setdefault('base_dir', os.getcwd())
    return spec


def stream_spec(text: str, split: str = 'train') -> StreamSpec:
    """Reads and checks a webdataset spec and lists its shards (raises DataSpecError / DataFileNotFoundError
    naming the path, StorageError naming a URL whose bucket cannot be reached)."""
    spec = read_spec(text)
    if spec.get('format') != 'webdataset':
        raise DataSpecError(f"data.spec: data.name='wds_stream' streams webdataset tar shards, but the spec's format "
                            f"is {spec.get('format')!r}; give format 'webdataset', or prepare the data with "
                            f"data.name='spec'")
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise DataSpecError(f'data.spec: unknown keys {sorted(unknown)}; known: {sorted(SPEC_KEYS)}')
    if 'paths' in spec and 'splits' in spec:
        raise DataSpecError("data.spec: give 'paths' (the train split) or 'splits', not both")
    splits = {'train': spec['paths']} if 'paths' in spec else dict(spec.get('splits') or {})
    if split not in splits:
        raise DataSpecError(f"data.spec: no shards for split {split!r} (data.train_split); the spec has "
                            f"{sorted(splits)}")
    shards = expand_shards(splits[split], str(spec['base_dir']))
    limits = DecodeLimits.from_mapping(spec.get('limits'))
    return StreamSpec(str(spec.get('name') or 'wds_stream'), tuple(shards), limits)


def expand_braces(pattern: str) -> list[str]:
    """'a/{000..002}.tar' -> ['a/000.tar', 'a/001.tar', 'a/002.tar'] (every range, zero-padded to its bounds)."""
    match = BRACES.search(pattern)
    if not match:
        return [pattern]
    low, high = match.group(1), match.group(2)
    out = []
    for n in range(int(low), int(high) + 1):
        out += expand_braces(pattern[:match.start()] + str(n).zfill(len(low)) + pattern[match.end():])
    return out


def expand_shards(paths: str | list[str], base: str) -> list[str]:
    """Patterns (relative to `base`, a folder or a bucket's folder) -> the sorted shard paths. A pattern matching
    nothing raises DataFileNotFoundError; a URL whose bucket cannot be reached, StorageError."""
    out, buckets = [], set()
    for pattern in [paths] if isinstance(paths, str) else list(paths):
        pattern = storage.check(str(pattern))
        if not storage.is_url(pattern):
            pattern = os.path.expanduser(pattern)
            if not os.path.isabs(pattern):
                pattern = storage.join(base, pattern)
        if storage.is_url(pattern) and _bucket(pattern) not in buckets:
            storage.reachable(pattern, 'shards of data.spec')
            buckets.add(_bucket(pattern))
        out.extend(_matches(pattern))
    return sorted(dict.fromkeys(out))


def _bucket(url: str) -> str:
    """'gs://bucket/a/b' -> 'gs://bucket'."""
    return '/'.join(url.split('/', 3)[:3])


def _matches(pattern: str) -> list[str]:
    """The shards one pattern names, brace ranges expanded; DataFileNotFoundError names a part that matches none.
    The literal paths of a brace range on a bucket are checked against one listing of their folder (a range of
    10,000 shards costs a few list requests, not 10,000 requests)."""
    parts = expand_braces(pattern)
    try:
        existing = _existing([p for p in parts if not any(c in p for c in GLOB_CHARS)])
        out = []
        for one in parts:
            matches = storage.glob(one) if any(c in one for c in GLOB_CHARS) else [one] if one in existing else []
            if not matches:
                raise DataFileNotFoundError(f'data.spec: no shard matches {one!r}; check the path (a relative one '
                                            f"is read from the spec file's folder)")
            out.extend(matches)
        return out
    except (DataSpecError, StorageError):
        raise
    except Exception as error:  # an object store's client raises its own kinds (HTTP errors, credentials)
        raise StorageError(f'cannot list the shards {pattern} of data.spec: {type(error).__name__}: '
                           f'{_first_line(error)}') from None


def _existing(paths: list[str]) -> set[str]:
    """Those of `paths` that are files; the folder of a URL is listed once."""
    found, listed = set(), {}
    for path in paths:
        if not storage.is_url(path):
            if storage.isfile(path):
                found.add(path)
            continue
        folder = storage.parent(path)
        if folder not in listed:
            listed[folder] = set(storage.glob(storage.join(folder, '*')))
        if path in listed[folder]:
            found.add(path)
    return found


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else ''


def _members(path: str) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each file member of tar shard `path` (plain or compressed), in order, streamed front to
    back; an object-store client's own errors become StorageError naming the shard."""
    try:
        with storage.open_file(path, 'rb') as handle, tarfile.open(fileobj=handle, mode='r|*') as tar:
            for member in tar:
                if member.isfile():
                    data = tar.extractfile(member)
                    yield member.name, data.read() if data is not None else b''
    except SHARD_ERRORS:
        raise
    except Exception as error:  # gcsfs' HttpError, aiohttp's errors, retries given up: not OSErrors
        raise StorageError(f'cannot read the shard {path}: {type(error).__name__}: {_first_line(error)}') from None


def iter_shard(path: str) -> Iterator[tuple[str, bytes | BadSample, list[Any]]]:
    """(key, image bytes | BadSample('missing_file'), raw captions) per sample of one tar shard (a local path or a
    URL), in order, read front to back. A shard that is gone or breaks off raises one of SHARD_ERRORS."""
    key, parts = None, {}
    for name, data in _members(path):
        folder, base = posixpath.split(name)
        stem, _, ext = base.partition('.')
        member_key = posixpath.join(folder, stem)
        if member_key != key:
            if key is not None and parts:
                yield webdataset_sample(path, key, parts)
            key, parts = member_key, {}
        parts[ext.lower()] = data
    if key is not None and parts:
        yield webdataset_sample(path, key, parts)


__all__ = ['SHARD_ERRORS', 'StreamSpec', 'expand_braces', 'expand_shards', 'iter_shard', 'load_spec_file', 'read_spec',
           'stream_spec']
