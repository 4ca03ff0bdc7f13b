"""Reading a data spec file (the JSON dict of mmjax/data/builders.py), local or on a bucket, with one-line errors
naming the file. Used by the prepared path (builders, `mmjax prepare`) and the streaming path (wds) alike."""

from __future__ import annotations

import json
from typing import Any

from mmjax import storage
from mmjax.data.decode import DataFileNotFoundError, DataSpecError
from mmjax.errors import StorageError


def load_spec_file(path: str) -> dict[str, Any]:
    """A JSON spec file, a local path or a gs:// / s3:// URL -> its dict, with 'base_dir' (where its relative
    paths are read from) set to the file's folder unless it names one. Raises StorageError (an unreachable bucket,
    a mistyped URL), DataFileNotFoundError, DataSpecError (not a JSON object), each naming the file."""
    where = storage.absolute(path)
    storage.reachable(where, 'spec file')
    try:
        raw = storage.read_text(where)
    except FileNotFoundError:
        raise DataFileNotFoundError(f'spec file {path!r} does not exist') from None
    except IsADirectoryError:
        raise DataSpecError(f'spec file {path!r} is a folder; give the JSON spec file in it') from None
    except StorageError:
        raise
    except OSError as error:  # no permission, an unreadable disk, the object store's own faults
        raise StorageError.from_os_error(error, 'cannot read the spec file', where) from error
    try:
        spec = json.loads(raw)
    except ValueError as error:
        raise DataSpecError(f'spec file {path!r} is not valid JSON: {error}') from None
    if not isinstance(spec, dict):
        raise DataSpecError(f'spec file {path!r} must hold a JSON object, not {type(spec).__name__}')
    spec.setdefault('base_dir', storage.parent(where))
    return spec
