"""Orbax's own error output, summarised: the checkpoint manager reports a failure once, as one line.

A failed async save makes Orbax log the same exception with its traceback from each of its background threads
(hundreds of lines for the tiny test model, about 1,540 for a larger one, through absl's logger, and once more per
array through asyncio's "Task/Future exception was never retrieved"), and a read
that fails makes tensorstore report every callback that arrives after Orbax closed its event loop
(`RuntimeError: Event loop is closed`) and every read coroutine that fails after the first (`Exception ignored
in: <coroutine ...>`), both through `sys.unraisablehook`. The `Checkpointer` raises one error naming
the checkpoint and the cause instead; `install()` keeps these records out of the output and counts them
(`take_errors`). `MMJAX_DEBUG=1` or `--debug` on the command line shows them again.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import sys

_hidden: collections.deque[str] = collections.deque(maxlen=50)


def debug() -> bool:
    return os.environ.get("MMJAX_DEBUG") == "1" or "--debug" in sys.argv[1:]


def _from_orbax(path: str | None) -> bool:
    return f"{os.sep}orbax{os.sep}" in (path or "")


def _orbax_task(record: logging.LogRecord, message: str) -> bool:
    """An asyncio "Task/Future exception was never retrieved" of one of Orbax's reads or writes: the task's code,
    the exception's frames or the checkpoint's path say so."""
    if "exception was never retrieved" not in message:
        return False
    tb = record.exc_info[2] if record.exc_info else None
    while tb is not None:
        if _from_orbax(tb.tb_frame.f_code.co_filename):
            return True
        tb = tb.tb_next
    return _from_orbax(message) or ".orbax-checkpoint-tmp" in message


class _OrbaxErrors(logging.Filter):
    """Drops the error records of Orbax and of its asyncio tasks (kept, first line only, for `take_errors`)."""

    mmjax = True

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or debug():
            return True
        message = record.getMessage()
        if not (_from_orbax(record.pathname) if record.name != "asyncio" else _orbax_task(record, message)):
            return True
        _hidden.append(message.strip().splitlines()[0][:500] if message.strip() else "")
        return False


def _orbax_noise(unraisable) -> bool:
    """Exceptions nobody can catch that a failed read leaves behind: tensorstore callbacks after Orbax closed its
    event loop, and Orbax's read coroutines garbage-collected with the error the restore already raised."""
    value = getattr(unraisable, "exc_value", None)
    if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
        return True
    code = getattr(getattr(unraisable, "object", None), "cr_code", None)
    return code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename


def _wrap_unraisablehook(previous):
    def hook(unraisable):
        if _orbax_noise(unraisable) and not debug():
            return
        previous(unraisable)

    hook.mmjax = True
    return hook


def install() -> None:
    """Installs both filters (once; again if something replaced the unraisable hook since)."""
    for name in ("absl", "asyncio"):
        logger = logging.getLogger(name)
        if not any(getattr(f, "mmjax", False) for f in logger.filters):
            logger.addFilter(_OrbaxErrors())
    if not getattr(sys.unraisablehook, "mmjax", False):
        sys.unraisablehook = _wrap_unraisablehook(sys.unraisablehook)


def take_errors() -> list[str]:
    """The first lines of the Orbax error records hidden since the last call."""
    out = list(_hidden)
    _hidden.clear()
    return out


def describe(e: BaseException, limit: int = 300) -> str:
    """One line about `e`: the OS's reason when tensorstore names one, then the first line of the most telling
    message of its chain (Orbax wraps tensorstore's errors in generic ones)."""
    chain, seen = [], e
    while seen is not None and len(chain) < 5:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    telling = next((x for x in chain if re.match(r"[A-Z_]{4,}: ", str(x))), chain[0])
    lines = str(telling).strip().splitlines()
    text = lines[0].split(" See full TensorStore details")[0] if lines else ""
    code = next((m for x in chain if (m := re.search(r"os_error_code='?(\d+)", str(x)))), None)
    reason = f"{os.strerror(int(code.group(1)))}: " if code else ""
    text = text if len(text) <= limit else text[:limit] + " ..."
    return f"{reason}{type(telling).__name__}: {text}"
