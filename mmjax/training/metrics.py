"""Where numbers go: `W/metrics.jsonl` (append-only; part files on object stores), TensorBoard events, and a
console progress line.

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
import struct
import sys
import time
from collections.abc import Callable, Iterator, Mapping

import numpy as np

from mmjax import storage
from mmjax.errors import StorageError


def _scalar(v) -> float:
    v = np.asarray(v)
    return float(v.reshape(()))


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _tensorboardx():
    """tensorboardX's (Event, Summary, masked_crc32c), imported without PyTorch.

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
        from tensorboardX.record_writer import masked_crc32c  # lazy: as above
    finally:
        if masked:
            del sys.modules["torch"]
    return Event, Summary, masked_crc32c


class _LocalAppend:
    """Appends to a local file, flushed at each write. `torn` tells whether the file ended in a torn line."""

    def __init__(self, path: str):
        self.path = path
        self._file = open(path, "a+b")  # local (a URL gets _ObjectParts); closed by close()
        self.torn = _ends_in_torn_line(self._file)

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class _ObjectParts:
    """"Appends" on an object store, which cannot append: the bytes of the current part are uploaded whole at each
    write (one PUT; a reader sees the previous upload or this one, never half of one), and once a part holds
    `rotate_bytes` the next write starts a new part, so an upload never exceeds that size and earlier parts are
    never rewritten. `name_part(n)` gives the URL of part n (counted from `first`)."""

    def __init__(self, name_part: Callable[[int], str], first: int, rotate_bytes: int,
                 header: bytes = b""):
        self.name_part, self.number, self.rotate_bytes, self.header = name_part, first, rotate_bytes, header
        self.path = name_part(first)
        self._data = bytearray(header)
        self.torn = False

    def write(self, data: bytes) -> None:
        if len(self._data) + len(data) > self.rotate_bytes and len(self._data) > len(self.header):
            self.number += 1
            self.path = self.name_part(self.number)
            self._data = bytearray(self.header)
        self._data += data
        storage.write_bytes_atomic(self.path, bytes(self._data))

    def close(self) -> None:
        pass


PART_BYTES = 1 << 20  # an object-store metrics part (or events file) is rotated at 1 MiB: each flush uploads ≤ 1 MiB
METRICS_PARTS = "metrics"  # W/metrics/part-00000.jsonl ... on object stores


def _part_name(workdir: str, number: int) -> str:
    return storage.join(workdir, METRICS_PARTS, f"part-{number:05d}.jsonl")


def _part_paths(workdir: str) -> list[str]:
    """The metrics part files of an object-store workdir, in order."""
    folder = storage.join(workdir, METRICS_PARTS)
    names = [n for n in storage.listdir(folder) if n.startswith("part-") and n.endswith(".jsonl")]
    return [storage.join(folder, n) for n in sorted(names)]


class _EventFile:
    """One TensorBoard events file (`events.out.tfevents.<time>.<host>`, as tensorboardX names it), written in the
    caller's thread: one event per step holding all its scalars, flushed at once. On a bucket each rotation starts
    a new events file (TensorBoard reads every file of the folder)."""

    def __init__(self, folder: str):
        self.event, self.summary, self._crc = _tensorboardx()

        def name(n: int) -> str:
            return storage.join(folder, f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}"
                                        + (f".{n}" if n else ""))

        header = self._record(self.event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString())
        if storage.is_url(folder):  # never over another run's file (two runs can start in one second)
            first = next(n for n in range(1 << 20) if not storage.exists(name(n)))
            self._sink = _ObjectParts(name, first, PART_BYTES, header=header)
        else:
            self._sink = _LocalAppend(name(0))
            self._sink.write(header)

    @property
    def path(self) -> str:
        return self._sink.path

    def _record(self, data: bytes) -> bytes:
        """TFRecord framing: length, its masked CRC-32C, the data, its masked CRC-32C."""
        length = struct.pack("Q", len(data))
        return length + struct.pack("I", self._crc(length)) + data + struct.pack("I", self._crc(data))

    def add(self, step: int, scalars: Mapping[str, float]) -> None:
        values = [self.summary.Value(tag=k, simple_value=v) for k, v in scalars.items()]
        event = self.event(wall_time=time.time(), step=int(step), summary=self.summary(value=values))
        self._sink.write(self._record(event.SerializeToString()))

    def close(self) -> None:
        self._sink.close()


def _ends_in_torn_line(f) -> bool:
    """Whether the binary file `f` (opened for reading too) is non-empty and does not end with a newline."""
    end = f.seek(0, os.SEEK_END)
    if end <= 0:
        return False
    f.seek(end - 1)
    return f.read(1) != b"\n"


class MetricsWriter:
    """Writes one JSON object per line of metrics, and mirrors scalars to TensorBoard (`W/tensorboard`).

    On a local or network disk the records are appended to `W/metrics.jsonl`. On an object store (which cannot
    append) they go to part files `W/metrics/part-NNNNN.jsonl`: the current part is uploaded whole at each write
    and rotated at `PART_BYTES`; a new run starts a new part; earlier parts are never rewritten. `read_metrics`
    reads either as one stream. Raises StorageError naming the file when a write fails. `log` reports a torn last
    line found in an existing metrics.jsonl (the first record then starts on a new line)."""

    def __init__(self, workdir: str, enabled: bool = True, log: Callable[[str], None] = _warn):
        self.enabled, self.log, self.workdir = enabled, log, workdir
        self.tb_dir = storage.join(workdir, "tensorboard")
        self._tb: _EventFile | None = None
        self._sink: _LocalAppend | _ObjectParts | None = None
        self._failed = False
        self.path = storage.join(workdir, "metrics.jsonl")
        if enabled:
            with self._storage("cannot write the TensorBoard events in", self.tb_dir):
                storage.makedirs(self.tb_dir)
                self._tb = _EventFile(self.tb_dir)

    def _open(self) -> None:
        if storage.is_url(self.workdir):
            parts = _part_paths(self.workdir)
            first = int(storage.name(parts[-1])[5:10]) + 1 if parts else 0
            self._sink = _ObjectParts(lambda n: _part_name(self.workdir, n), first, PART_BYTES)
            self.path = self._sink.path
            return
        self._sink = _LocalAppend(self.path)
        if self._sink.torn:
            self.log(f"mmjax: {self.path} ended in a torn line (a crash while a record was written); "
                     f"the next record starts on a new line")
            self._sink.write(b"\n")

    @contextlib.contextmanager
    def _storage(self, what: str, path: str) -> Iterator[None]:
        """Turns an OSError into a StorageError naming `path`, and remembers that writing failed."""
        try:
            yield
        except OSError as error:
            self._failed = True
            raise StorageError.from_os_error(error, what, path) from error

    def write(self, step: int, metrics: Mapping[str, float]) -> dict:
        record = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
        if not self.enabled:
            return record
        with self._storage("cannot write the metrics to", self.path):
            if self._sink is None:
                self._open()
            self._sink.write((json.dumps(record) + "\n").encode("utf-8"))
            self.path = self._sink.path
        with self._storage("cannot write the TensorBoard events to", self._tb.path):
            self._tb.add(step, {k: v for k, v in record.items() if k != "step" and math.isfinite(v)})
        return record

    def close(self) -> None:
        if self._sink is not None:
            sink, self._sink = self._sink, None
            with contextlib.suppress(OSError):
                sink.close()
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
    """All records of the run's metrics, in order, as one stream: `W/metrics.jsonl` (local workdirs) and then the
    part files `W/metrics/part-*.jsonl` (object-store workdirs). A line that is not a record (a torn last line,
    left by a crash while it was written) is skipped and reported through `log`, naming the file and the line."""
    records = []
    for path in [storage.join(workdir, "metrics.jsonl"), *_part_paths(workdir)]:
        if storage.exists(path):
            records += _read_lines(path, storage.read_bytes(path), log)
    return records


def _read_lines(path: str, data: bytes, log: Callable[[str], None]) -> list[dict]:
    lines = [(n, line) for n, line in enumerate(data.split(b"\n"), 1) if line.strip()]
    records, skipped = [], []
    for number, line in lines:
        record = _record_or_none(line)
        if record is None:
            skipped.append(number)
        else:
            records.append(record)
    if lines and skipped == [lines[-1][0]]:
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
