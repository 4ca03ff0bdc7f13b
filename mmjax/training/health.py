"""Keeping a long run honest: preemption signals, non-finite steps, loss spikes.

`PreemptionGuard` turns SIGTERM into a request the loop honours after the current step (checkpoint,
wait until durable, exit 0); a second SIGTERM while saving is reported and ignored.
`HealthMonitor` reads each step's metrics on the host: it counts skipped (non-finite) updates, names
the batch that caused each, stops the run after K in a row, and reports loss spikes.
"""

from __future__ import annotations

import collections
import math
import signal
import threading

from mmjax.errors import RuntimeFault


class NonFiniteError(RuntimeFault, RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


class PreemptionGuard:
    """Context manager: while active, SIGTERM sets `requested` instead of killing the process."""

    def __init__(self, log=print):
        self.requested = False
        self.log = log
        self._previous = None

    def _handler(self, signum, frame):
        if self.requested:
            self.log("mmjax: SIGTERM again: already stopping after a checkpoint; ignoring it")
            return
        self.requested = True
        self.log("mmjax: SIGTERM received: finishing this step, then checkpointing and exiting")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    def __exit__(self, *exc):
        # After a preemption stop the process is on its way out: keep ignoring further SIGTERMs so a
        # late one cannot kill it between the durable checkpoint and a clean exit.
        if self._previous is not None and not self.requested:
            signal.signal(signal.SIGTERM, self._previous)
        return False


class HealthMonitor:
    """Watches per-step metrics ({'loss', 'skipped', ...} as host scalars).

    max_nonfinite: stop after this many consecutive skipped steps (NonFiniteError).
    spike_factor: report a loss above `spike_factor` x the running mean of the last `window` finite
      losses (0 disables).
    """

    def __init__(self, max_nonfinite: int, spike_factor: float, window: int, batch_size: int,
                 log=print):
        self.max_nonfinite = max_nonfinite
        self.spike_factor = spike_factor
        self.batch_size = batch_size
        self.log = log
        self.recent = collections.deque(maxlen=window)
        self.streak = 0
        self.skipped_total = 0
        self.spikes_total = 0

    def batch_description(self, step: int) -> str:
        """The global examples a step consumed: the data stream is the same on every topology."""
        start = (step - 1) * self.batch_size
        return f"global examples [{start}, {start + self.batch_size}) of the data stream"

    def observe(self, step: int, metrics) -> None:
        loss = float(metrics["loss"])
        if int(metrics.get("skipped", 0)):
            self.streak += 1
            self.skipped_total += 1
            self.log(f"mmjax: step {step}: non-finite loss ({loss}) or gradient "
                     f"(norm {float(metrics.get('grad_norm', math.nan))}); update skipped "
                     f"({self.streak} in a row, {self.skipped_total} in all). Batch: "
                     f"{self.batch_description(step)}")
            if self.streak >= self.max_nonfinite:
                raise NonFiniteError(
                    f"{self.streak} consecutive steps (up to step {step}) had a non-finite loss or "
                    f"gradient (train.max_nonfinite_steps={self.max_nonfinite}); stopping. No "
                    f"checkpoint was written from a non-finite state. Lower optim.lr, check the "
                    f"data around {self.batch_description(step)}, or raise the limit.")
            return
        self.streak = 0
        if self.spike_factor > 0 and len(self.recent) >= min(10, self.recent.maxlen):
            mean = sum(self.recent) / len(self.recent)
            if mean > 0 and loss > self.spike_factor * mean:
                self.spikes_total += 1
                self.log(f"mmjax: step {step}: loss spike {loss:.4g} > {self.spike_factor} x running "
                         f"mean {mean:.4g}. Batch: {self.batch_description(step)}")
        self.recent.append(loss)

    def counters(self) -> dict[str, int]:
        return {"skipped_steps": self.skipped_total, "loss_spikes": self.spikes_total}
