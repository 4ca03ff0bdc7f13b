"""The one path layer: every file mmjax reads or writes may be a local path or an object-store URL.

A path is a `str` everywhere in mmjax: a local path (`runs/demo`, `/data/x.tar`) or a URL (`gs://bucket/run1`,
`s3://bucket/shards/00001.tar`). Every read, write, listing and glob goes through this module: plain file calls
for local paths, fsspec's gcsfs / s3fs for URLs (the filesystems `etils.epath`, Orbax's path layer, uses too), with
the listing cache dropped before each call so that what other hosts and runs wrote is seen. So a workdir, its
checkpoints, metrics, events and figures, data specs, shard globs, `data_dir` and tokenizer files all work on a
bucket, and no local folder named `gs:` or `s3:` is ever created.

Object stores cannot append or rename atomically. What that changes:
  * `write_text_atomic` writes a local file through a temporary file and a rename; on a bucket one PUT is
    already atomic (a reader sees the old object or the new one, never half of one);
  * `makedirs` does nothing on a bucket (folders are key prefixes);
  * appending logs (metrics.jsonl) is designed in `mmjax/training/metrics.py` (part files).

Errors: a storage fault (no such bucket, no credentials, a full disk, no permission) becomes a `StorageError`
naming the path; `reachable` checks a URL before a run compiles anything. Unknown schemes are refused.
"""

from __future__ import annotations

import contextlib
import glob as _glob
import os
import shutil
from collections.abc import Iterator
from typing import IO, Any

import fsspec

from mmjax.errors import MmjaxError, StorageError

SCHEMES = ("gs", "s3")


class PathError(MmjaxError, ValueError):
    """A path mmjax refuses to use: an unknown URL scheme, or a URL typed with one slash (exit code 2)."""


def is_url(path: Any) -> bool:
    """Whether `path` is an object-store URL (`gs://...`, `s3://...`)."""
    return "://" in os.fspath(path)


def scheme(path: Any) -> str:
    """'gs', 's3', or '' for a local path."""
    text = os.fspath(path)
    return text.split("://", 1)[0] if "://" in text else ""


def check(path: Any) -> str:
    """`path` as a str, after refusing what would silently go to the wrong place: an unknown URL scheme, and a
    local path that starts with `gs:` / `s3:` (a URL typed with one slash, which a local file API would turn
    into a local folder named `gs:`)."""
    text = os.fspath(path)
    if "://" in text:
        if scheme(text) not in SCHEMES:
            raise PathError(f"unsupported storage URL {text!r}: mmjax reads and writes local paths, gs:// and "
                               "s3:// URLs")
        return text
    first = text.split("/", 1)[0]
    if first.rstrip(":") in SCHEMES and first.endswith(":"):
        raise PathError(f"path {text!r} looks like a mistyped URL (one slash after '{first}'); write "
                           f"{first}//bucket/... for an object store, or ./{text} for a local folder")
    return text


def check_local(p: Any, key: str, why: str) -> str:
    """`p` as a str if it is a local path; a one-line PathError naming `key` and `why` if it is a URL."""
    text = check(p)
    if is_url(text):
        raise PathError(f"{key}: {text} is an object-store URL, but {why}; use a local folder")
    return text


def join(base: Any, *parts: str) -> str:
    """`base/part/...` as a str, for local paths and URLs alike."""
    text = check(base)
    if not parts:
        return text
    if is_url(text):
        return "/".join([text.rstrip("/"), *(str(p).strip("/") for p in parts if str(p))])
    return os.path.join(text, *parts)


def parent(p: Any) -> str:
    """The folder holding `p`."""
    text = check(p).rstrip("/")
    if is_url(text):
        head, _, _ = text.rpartition("/")
        return head if "://" in head and len(head) > len(scheme(text)) + 3 else text
    return os.path.dirname(text)


def name(p: Any) -> str:
    """The last component of `p`."""
    return check(p).rstrip("/").rpartition("/")[2]


def absolute(p: Any) -> str:
    """A local path made absolute (`~` expanded); a URL as it is."""
    text = check(p)
    return text if is_url(text) else os.path.abspath(os.path.expanduser(text))


@contextlib.contextmanager
def storage_errors(what: str, p: Any) -> Iterator[None]:
    """Turns an OSError (and the object-store clients' errors, which are OSErrors or carry HTTP codes) met
    inside into a `StorageError` saying `what` failed on `p`. FileNotFoundError passes through unchanged where
    the caller expects it."""
    try:
        yield
    except FileNotFoundError:
        raise
    except StorageError:
        raise
    except OSError as error:
        raise StorageError.from_os_error(error, what, os.fspath(p)) from error


def _fs(p: Any):
    """(fsspec filesystem, URL) for a URL, its listing cache dropped: other processes (the other hosts of a run,
    an earlier run) change a bucket, and a cached listing or size would not show it."""
    text = check(p)
    fs = _filesystem(text)
    fs.invalidate_cache()
    return fs, text


def exists(p: Any) -> bool:
    if is_url(check(p)):
        fs, url = _fs(p)
        return fs.exists(url)
    return os.path.exists(p)


def isdir(p: Any) -> bool:
    """Whether `p` is a folder (on a bucket: a prefix with at least one object under it)."""
    if is_url(check(p)):
        fs, url = _fs(p)
        return fs.isdir(url)
    return os.path.isdir(p)


def isfile(p: Any) -> bool:
    if is_url(check(p)):
        fs, url = _fs(p)
        return fs.isfile(url)
    return os.path.isfile(p)


def makedirs(p: Any) -> None:
    """Creates a local folder and its parents; nothing on a bucket, where folders are key prefixes."""
    if not is_url(check(p)):
        os.makedirs(p, exist_ok=True)


def read_bytes(p: Any) -> bytes:
    if is_url(check(p)):
        fs, url = _fs(p)
        return fs.cat_file(url)
    with open(p, "rb") as f:
        return f.read()


def read_text(p: Any) -> str:
    return read_bytes(p).decode()


def open_file(p: Any, mode: str = "rb") -> IO:
    """A file object for reading (`rb`, `r`) or writing (`wb`, `w`; on a bucket the object appears on close)."""
    if is_url(check(p)):
        fs, url = _fs(p)
        return fs.open(url, mode)
    return open(p, mode)  # noqa: SIM115 - the caller closes it


def write_bytes_atomic(p: Any, data: bytes) -> None:
    """Writes `data` so that a reader never sees a partial file: a local temporary file renamed over `p`; on a
    bucket one upload (objects appear whole)."""
    text = check(p)
    if is_url(text):
        fs, url = _fs(text)
        fs.pipe_file(url, data)
        return
    tmp = f"{text}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, text)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(p: Any, text: str) -> None:
    write_bytes_atomic(p, text.encode())


def remove(p: Any) -> None:
    """Deletes one file; a missing file is not an error."""
    if is_url(check(p)):
        fs, url = _fs(p)
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(url)
        return
    with contextlib.suppress(FileNotFoundError):
        os.remove(p)


def rmtree(p: Any) -> None:
    """Deletes a folder and everything under it; a missing folder is not an error."""
    if is_url(check(p)):
        fs, url = _fs(p)
        if fs.exists(url):
            fs.rm(url, recursive=True)
        fs.invalidate_cache()
        return
    shutil.rmtree(p, ignore_errors=True)


def rename(src: Any, dst: Any) -> None:
    """Moves `src` (a file or a folder) to `dst` (a rename on a local disk; on a bucket a copy and delete of every
    object under it, where folders need not exist first)."""
    source, target = check(src), check(dst)
    if is_url(source):
        fs, url = _fs(source)
        bare = url.split("://", 1)[1].rstrip("/")
        files = [f for f in fs.find(url) if f.rstrip("/") != bare] if fs.isdir(url) else []
        for f in files:  # object by object: s3fs cannot move a "folder" key itself
            fs.mv(f, target.rstrip("/") + f[len(bare):])
        if not files:
            fs.mv(url, target)
        fs.invalidate_cache()
    else:
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
        os.rename(source, target)


def listdir(p: Any) -> list[str]:
    """The names directly under folder `p`, sorted; [] if it does not exist."""
    if is_url(check(p)):
        fs, url = _fs(p)
        if not fs.isdir(url):
            return []
        return sorted(entry.rstrip("/").rpartition("/")[2] for entry in fs.ls(url, detail=False)
                      if entry.rstrip("/") != url.split("://", 1)[1].rstrip("/"))
    if not os.path.isdir(p):
        return []
    return sorted(os.listdir(p))


def newest_numbered(p: Any) -> int | None:
    """The largest name under folder `p` that is a number (an Orbax checkpoint directory's newest step), None when
    there is none or `p` does not exist."""
    return max((int(n) for n in listdir(p) if n.isdigit()), default=None)


def _filesystem(url: str):
    fs, _ = fsspec.core.url_to_fs(url)
    return fs


def glob(pattern: Any) -> list[str]:
    """The files matching `pattern` (`*`, `?`, `[...]`, `**`), sorted; URLs keep their scheme."""
    text = check(pattern)
    if not is_url(text):
        return sorted(_glob.glob(os.path.expanduser(text), recursive=True))
    prefix = f"{scheme(text)}://"
    fs, url = _fs(text)
    return sorted(m if m.startswith(prefix) else prefix + m for m in fs.glob(url))


def size(p: Any) -> int:
    """The size of file `p` in bytes."""
    if is_url(check(p)):
        fs, url = _fs(p)
        return fs.size(url)
    return os.path.getsize(p)


def reachable(p: Any, what: str = "path") -> None:
    """Raises a one-line `StorageError` if the bucket of URL `p` cannot be reached (no such bucket, no
    credentials, no network); nothing for local paths. Run before anything compiles."""
    text = check(p)
    if not is_url(text):
        return
    bucket = text.split("://", 1)[1].split("/", 1)[0]
    root = f"{scheme(text)}://{bucket}"
    try:
        fs = _filesystem(root)
        fs.invalidate_cache()
        fs.ls(root, detail=False)
    except Exception as error:  # noqa: BLE001 - the clients raise many kinds (OSError, HTTP, credentials)
        reason = ("no such bucket" if isinstance(error, FileNotFoundError) else
                  str(error).splitlines()[0] if str(error) else type(error).__name__)
        advice = ("check the bucket name and your credentials (`gcloud auth application-default login`)"
                  if scheme(text) == "gs" else
                  "check the bucket name and your credentials (AWS_* variables or ~/.aws), and AWS_ENDPOINT_URL")
        raise StorageError(f"cannot reach the {what} {text}: bucket {root} is not reachable ({reason}); "
                           f"{advice}") from error
