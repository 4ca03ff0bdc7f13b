"""One advisory file lock for everything mmjax builds once per data_dir (datasets, synthesised audio)."""

from __future__ import annotations

import contextlib
import fcntl


@contextlib.contextmanager
def file_lock(path: str):
    """Exclusive advisory lock on `path` (created if missing), so concurrent processes build a thing once."""
    with open(path, 'w') as handle:  # local: data_dir builds are local (digits.check_local)
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
