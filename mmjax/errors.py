"""mmjax's own errors. Every error mmjax raises on purpose derives from `MmjaxError`.

The `mmjax` command prints such an error as one line, `mmjax: error: <message>`, and exits with its
`exit_code`: 2 for usage and config problems (the default), 1 for faults met while running (storage, data,
a diverged run). An OSError of the storage (a full disk, a read-only file system, no permission) is reported
the same way, as a `StorageError` (exit 1). Any other exception is a bug or an unexpected fault and shows its
traceback.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence


class MmjaxError(Exception):
    """Base of mmjax's errors; `exit_code` is what the `mmjax` command exits with."""

    exit_code = 2


class RuntimeFault(MmjaxError):
    """A fault met while running (storage, data, a diverged run): the `mmjax` command exits 1."""

    exit_code = 1


class ConfigError(MmjaxError, ValueError):
    """One or more config problems; the message names each with its key and a fix (one problem: one line; several:
    one line each under a heading)."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        if len(self.problems) == 1:
            super().__init__(f"invalid config: {self.problems[0]}")
            return
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid config ({len(self.problems)} problems):\n{lines}")


class NotAWorkdirError(MmjaxError, FileNotFoundError):
    """A folder given as a workdir has no config.json."""


class StorageError(RuntimeFault, OSError):
    """Reading or writing a file of the run failed for a reason of the storage (a full disk, a read-only or
    unwritable folder); the message names the file and what to do. `from_os_error` builds one from an OSError."""

    @classmethod
    def from_os_error(cls, error: OSError, what: str = "", path: str | None = None) -> StorageError:
        """`what` (e.g. 'cannot write the metrics') and the file (`path`, else the OSError's) with the OS's reason
        and what to do about it."""
        path = path or error.filename
        where = f" {path}" if path else ""
        reason = error.strerror or str(error) or type(error).__name__
        return cls(f"{what or 'cannot read or write'}{where}: {reason}; {storage_advice(error)}")


# errno -> what to do. A full disk, a read-only file system and missing permissions are faults of the storage,
# never of mmjax: the `mmjax` command reports any OSError of these as one line (`StorageError`).
_STORAGE_ADVICE = {
    "ENOSPC": "the disk is full: free space on it (or use a --workdir on another disk), then run the same command "
              "again (training resumes from its last checkpoint)",
    "EDQUOT": "the disk quota is used up: free space (or use a --workdir elsewhere), then run the same command again",
    "EROFS": "the file system is read-only: use a writable --workdir (or remount it read-write)",
    "EACCES": "permission denied: fix the folder's permissions or use a --workdir you can write to",
    "EPERM": "operation not permitted: fix the folder's permissions or use a --workdir you can write to",
}


def is_storage_fault(error: OSError) -> bool:
    """Whether `error` is the storage's fault (a full disk, a read-only file system, no permission on a file),
    not a bug of mmjax."""
    name = errno.errorcode.get(error.errno or 0, "")
    if name in ("EACCES", "EPERM"):  # also met outside files (signals, priorities): only with a file named
        return error.filename is not None
    return name in _STORAGE_ADVICE


def storage_advice(error: OSError) -> str:
    """What to do about a failed read or write (by its errno)."""
    name = errno.errorcode.get(error.errno or 0, "")
    return _STORAGE_ADVICE.get(name, "check that the storage is mounted, writable and has free space")
