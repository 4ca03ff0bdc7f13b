"""Where numbers go: `W/metrics.jsonl` (append-only), TensorBoard events, and a console progress line.

Only process 0 writes; other processes get a writer that does nothing, so callers need no `if`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping

import numpy as np


def _scalar(v) -> float:
    v = np.asarray(v)
    return float(v.reshape(()))


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without PyTorch.

    tensorboardX imports torch whenever it is installed (as with the `openclip` extra), only to recognise
    torch tensors: that took 3 s of every `mmjax train` start here. mmjax writes Python floats, so the import
    runs with torch marked absent, unless torch is already loaded.
    """
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter  # lazy: see the docstring (torch's 3 s import)
        return SummaryWriter
    sys.modules["torch"] = None  # makes `import torch` raise ImportError
    try:
        from tensorboardX import SummaryWriter  # lazy: imported with torch marked absent
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricsWriter:
    """Appends one JSON object per line to `W/metrics.jsonl` and mirrors scalars to TensorBoard."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            self._tb = _summary_writer_class()(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, float]) -> dict:
        record = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
        if not self.enabled:
            return record
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if k != "step" and math.isfinite(v):
                self._tb.add_scalar(k, v, int(step))
        self._tb.flush()
        return record

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
    """All records of `W/metrics.jsonl`, in order."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


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
