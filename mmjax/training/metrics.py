"""Where numbers go: `W/metrics.jsonl` (append-only), TensorBoard events, and a console progress line.

Only process 0 writes; other processes get a writer that does nothing, so callers need no `if`. A failed write
(a full disk, a read-only workdir) raises `StorageError` naming the file, in the training loop's own thread: the
TensorBoard events are written by this module, synchronously, not by tensorboardX's background thread (whose
errors would only print a traceback while the run went on, and then block it once its queue filled).

A crash while a record was being appended can leave a torn last line in `metrics.jsonl`. `read_metrics` skips
and reports it (naming the file); the next writer starts its first record on a new line.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator, Mapping

import numpy as np

from mmjax.errors import StorageError


def _scalar(v) -> float:
    v = np.asarray(v)
    return float(v.reshape(()))


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _tensorboardx():
    """tensorboardX's (RecordWriter, Event, Summary), imported without PyTorch.

    tensorboardX imports torch whenever it is installed (as with the `openclip` extra), only to recognise
    torch tensors: that took 3 s of every `mmjax train` start here. mmjax writes Python floats, so the import
    runs with torch marked absent, unless torch is already loaded.
    """
    masked = "torch" not in sys.modules
    if masked:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError
    try:
        from tensorboardX.proto.event_pb2 import Event  # lazy: see the docstring (torch's 3 s import)
        from tensorboardX.proto.summary_pb2 import Summary  # lazy: as above
        from tensorboardX.record_writer import RecordWriter  # lazy: as above
    finally:
        if masked:
            del sys.modules["torch"]
    return RecordWriter, Event, Summary


class _EventFile:
    """One TensorBoard events file (`events.out.tfevents.<time>.<host>`, as tensorboardX names it), written in the
    caller's thread: one event per step holding all its scalars, flushed at once."""

    def __init__(self, folder: str):
        self.record_writer, self.event, self.summary = _tensorboardx()
        self.path = os.path.join(folder, f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}")
        self._file = self.record_writer(self.path)
        self._write(self.event(wall_time=time.time(), file_version="brain.Event:2"))

    def _write(self, event) -> None:
        self._file.write(event.SerializeToString())
        self._file.flush()

    def add(self, step: int, scalars: Mapping[str, float]) -> None:
        values = [self.summary.Value(tag=k, simple_value=v) for k, v in scalars.items()]
        self._write(self.event(wall_time=time.time(), step=int(step), summary=self.summary(value=values)))

    def close(self) -> None:
        self._file.close()


def _ends_in_torn_line(f) -> bool:
    """Whether the binary file `f` (opened for reading too) is non-empty and does not end with a newline."""
    end = f.seek(0, os.SEEK_END)
    if end <= 0:
        return False
    f.seek(end - 1)
    return f.read(1) != b"\n"


class MetricsWriter:
    """Appends one JSON object per line to `W/metrics.jsonl` and mirrors scalars to TensorBoard (`W/tensorboard`).

    Raises StorageError naming the file when a write fails. `log` reports a torn last line found in an existing
    metrics.jsonl (the first record then starts on a new line)."""

    def __init__(self, workdir: str, enabled: bool = True, log: Callable[[str], None] = _warn):
        self.enabled, self.log = enabled, log
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb_dir = os.path.join(workdir, "tensorboard")
        self._tb: _EventFile | None = None
        self._checked_tail = False
        self._failed = False
        if enabled:
            with self._storage("cannot write the TensorBoard events in", self.tb_dir):
                os.makedirs(self.tb_dir, exist_ok=True)
                self._tb = _EventFile(self.tb_dir)

    @contextlib.contextmanager
    def _storage(self, what: str, path: str) -> Iterator[None]:
        """Turns an OSError into a StorageError naming `path`, and remembers that writing failed."""
        try:
            yield
        except OSError as error:
            self._failed = True
            raise StorageError.from_os_error(error, what, path) from error

    def _append(self, line: str) -> None:
        with open(self.path, "a+b") as f:
            if not self._checked_tail:
                self._checked_tail = True
                if _ends_in_torn_line(f):
                    self.log(f"mmjax: {self.path} ended in a torn line (a crash while a record was written); "
                             f"the next record starts on a new line")
                    line = "\n" + line
            f.write(line.encode("utf-8"))

    def write(self, step: int, metrics: Mapping[str, float]) -> dict:
        record = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
        if not self.enabled:
            return record
        with self._storage("cannot write the metrics to", self.path):
            self._append(json.dumps(record) + "\n")
        with self._storage("cannot write the TensorBoard events to", self._tb.path):
            self._tb.add(step, {k: v for k, v in record.items() if k != "step" and math.isfinite(v)})
        return record

    def close(self) -> None:
        if self._tb is None:
            return
        tb, self._tb = self._tb, None
        try:
            with self._storage("cannot write the TensorBoard events to", tb.path):
                tb.close()
        except StorageError:
            if not self._failed:  # a write already failed: that error is the one to report
                raise


def _record_or_none(line: bytes) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:  # a torn line: not JSON, or not UTF-8
        return None
    ok = isinstance(record, dict) and isinstance(record.get("step"), int)
    return record if ok else None


def read_metrics(workdir: str, log: Callable[[str], None] = _warn) -> list[dict]:
    """All records of `W/metrics.jsonl`, in order. A line that is not a record (a torn last line, left by a crash
    while it was written) is skipped and reported through `log`, naming the file and the line."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        lines = [(n, line) for n, line in enumerate(f.read().split(b"\n"), 1) if line.strip()]
    records, skipped = [], []
    for number, line in lines:
        record = _record_or_none(line)
        if record is None:
            skipped.append(number)
        else:
            records.append(record)
    if skipped == [lines[-1][0]]:
        log(f"mmjax: skipped the torn last line ({skipped[0]}) of {path}: a crash while it was written")
    elif skipped:
        log(f"mmjax: skipped {len(skipped)} unreadable line(s) of {path} (lines {', '.join(map(str, skipped[:10]))}"
            f"{', ...' if len(skipped) > 10 else ''}): torn by crashes while they were written")
    return records


class Progress:
    """Console progress line: step, loss, samples/s, ETA. Speed excludes the compile step."""

    def __init__(self, total_steps: int, batch_size: int, start_step: int, enabled: bool = True,
                 stream=sys.stdout):
        self.total = total_steps
        self.batch_size = batch_size
        self.enabled = enabled
        self.stream = stream
        self._t0 = None
        self._s0 = start_step

    def mark_compiled(self, step: int) -> None:
        """Call once the first step has finished: timing starts here."""
        self._t0 = time.perf_counter()
        self._s0 = step

    def exclude(self, seconds: float) -> None:
        """Leaves `seconds` (e.g. an evaluation inside the loop) out of the speed and ETA figures."""
        if self._t0 is not None:
            self._t0 += seconds

    def samples_per_second(self, step: int) -> float:
        if self._t0 is None or step <= self._s0:
            return float("nan")
        return (step - self._s0) * self.batch_size / (time.perf_counter() - self._t0)

    def eta_seconds(self, step: int) -> float:
        sps = self.samples_per_second(step)
        if not math.isfinite(sps) or sps <= 0:
            return float("nan")
        return (self.total - step) * self.batch_size / sps

    def line(self, step: int, metrics: Mapping[str, float]) -> str:
        eta = self.eta_seconds(step)
        eta_s = "?" if not math.isfinite(eta) else f"{int(eta) // 60}m{int(eta) % 60:02d}s"
        parts = [f"step {step}/{self.total}"]
        for k in ("loss", "lr", "logit_scale"):
            if k in metrics:
                parts.append(f"{k} {_scalar(metrics[k]):.4g}")
        sps = self.samples_per_second(step)
        if math.isfinite(sps):
            parts.append(f"{sps:.1f} samples/s")
        if "mfu" in metrics:
            parts.append(f"{_scalar(metrics['tflops_per_device']):.3g} TFLOP/s/device, "
                         f"MFU {100 * _scalar(metrics['mfu']):.1f}%")
        parts.append(f"ETA {eta_s}")
        return " | ".join(parts)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        if self.enabled:
            print(self.line(step, metrics), file=self.stream, flush=True)
