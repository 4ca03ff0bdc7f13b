"""Webdataset / img2dataset tar shards read in place, for the streaming loader (mmjax/data/stream.py).

Every path goes through `etils.epath`, so a spec, its shard globs and the shards themselves may be local paths or
object-store URLs (gs://, s3://: whatever fsspec / gcsfs / s3fs reach with the object-store settings present).

The spec is the builder spec of mmjax/data/builders.py (format 'webdataset'; the same file serves both paths):

    {"name": "laion_part", "format": "webdataset", "paths": "shards/{00000..00099}.tar",
     "limits": {"max_bad_fraction": 0.1}}

`paths` (or `splits[train_split]`) is one pattern or a list; relative ones are read from the spec file's folder
(an inline JSON spec: the working directory, or `base_dir`). A pattern may use glob characters (`*`, `?`, `[...]`)
and webdataset's brace ranges (`{00000..00099}`, zero-padded like the bounds); each must match a shard.

A shard is read once, front to back, in tar streaming mode (an object store serves it as one sequential read);
members `{key}.jpg|jpeg|png|webp` + `{key}.txt` (or `{key}.json` with a 'caption') of one key are consecutive,
as in mmjax/data/builders.py's reader.
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

from etils import epath

from mmjax.data.builders import webdataset_sample
from mmjax.data.decode import BadSample, DataFileNotFoundError, DataSpecError, DecodeLimits

SPEC_KEYS = {'name', 'format', 'paths', 'splits', 'base_dir', 'limits', 'description', 'image_column',
             'caption_column', 'delimiter', 'image_root'}
GLOB_CHARS = '*?['
BRACES = re.compile(r'\{(\d+)\.\.(\d+)\}')
# What reading a shard that is gone, truncated or unreachable raises (a bucket's client adds its own OSErrors).
SHARD_ERRORS = (OSError, EOFError, tarfile.TarError, ValueError)


@dataclasses.dataclass(frozen=True)
class StreamSpec:
    """A webdataset spec resolved for streaming: its name, its shards (sorted; their positions are the shard ids
    of the iterator state) and its decode limits."""

    name: str
    shards: tuple[str, ...]
    limits: DecodeLimits


def read_spec(text: str) -> dict[str, Any]:
    """`data.spec` (a spec file path or URL, or an inline JSON object) -> the spec dict with 'base_dir' set."""
    text = str(text).strip()
    if not text:
        raise DataSpecError("data.spec: give the webdataset spec (a JSON file, or an inline JSON object) for "
                            "data.name='wds_stream'")
    if text.startswith('{'):
        raw, base = text, os.getcwd()
    else:
        path = epath.Path(os.path.expanduser(text))
        try:
            raw = path.read_text()
        except FileNotFoundError:
            raise DataFileNotFoundError(f'data.spec: spec file {text!r} does not exist') from None
        except Exception as error:  # an object store's client raises its own errors (no bucket, no credentials)
            raise DataSpecError(f'data.spec: cannot read spec file {text!r}: {type(error).__name__}: '
                                f'{_first_line(error)}') from None
        base = str(path.parent)
    try:
        spec = json.loads(raw)
    except ValueError as error:
        raise DataSpecError(f'data.spec: {text[:80]!r} is not valid JSON: {error}') from None
    if not isinstance(spec, dict):
        raise DataSpecError(f'data.spec: {text[:80]!r} must hold a JSON object, not {type(spec).__name__}')
    spec.setdefault('base_dir', base)
    return spec


def stream_spec(text: str, split: str = 'train') -> StreamSpec:
    """Reads and checks a webdataset spec and lists its shards (raises DataSpecError / DataFileNotFoundError
    naming the path)."""
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
    """Patterns (relative to `base`) -> the sorted shard paths; a pattern matching nothing raises."""
    out = []
    for pattern in [paths] if isinstance(paths, str) else list(paths):
        pattern = os.path.expanduser(str(pattern))
        if '://' not in pattern and not os.path.isabs(pattern):
            pattern = str(epath.Path(base) / pattern)
        for one in expand_braces(pattern):
            try:
                matches = _glob(one)
            except Exception as error:  # an object store's client: no bucket, no credentials, no network
                raise DataSpecError(f'data.spec: cannot list {one!r}: {type(error).__name__}: '
                                    f'{_first_line(error)}') from None
            if not matches:
                raise DataFileNotFoundError(f'data.spec: no shard matches {one!r}; check the path (a relative one '
                                            f"is read from the spec file's folder)")
            out.extend(matches)
    return sorted(dict.fromkeys(out))


def _glob(pattern: str) -> list[str]:
    if not any(c in pattern for c in GLOB_CHARS):
        return [pattern] if epath.Path(pattern).exists() else []
    parts = pattern.split('/')
    first = next(i for i, part in enumerate(parts) if any(c in part for c in GLOB_CHARS))
    root = '/'.join(parts[:first]) or ('/' if pattern.startswith('/') else '.')
    return sorted(str(p) for p in epath.Path(root).glob('/'.join(parts[first:])))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else ''


def iter_shard(path: str) -> Iterator[tuple[str, bytes | BadSample, list[Any]]]:
    """(key, image bytes | BadSample('missing_file'), raw captions) per sample of one tar shard (plain or
    compressed), in order, read front to back. A shard that is gone or breaks off raises one of SHARD_ERRORS."""
    with epath.Path(path).open('rb') as handle, tarfile.open(fileobj=handle, mode='r|*') as tar:
        key, parts = None, {}
        for member in tar:
            if not member.isfile():
                continue
            folder, base = posixpath.split(member.name)
            stem, _, ext = base.partition('.')
            member_key = posixpath.join(folder, stem)
            if member_key != key:
                if key is not None and parts:
                    yield webdataset_sample(path, key, parts)
                key, parts = member_key, {}
            data = tar.extractfile(member)
            parts[ext.lower()] = data.read() if data is not None else b''
        if key is not None and parts:
            yield webdataset_sample(path, key, parts)


__all__ = ['SHARD_ERRORS', 'StreamSpec', 'expand_braces', 'expand_shards', 'iter_shard', 'read_spec', 'stream_spec']
