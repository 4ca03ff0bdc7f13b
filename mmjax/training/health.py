"""Keeping a long run honest: preemption signals, non-finite steps, loss spikes.

`PreemptionGuard` turns SIGTERM and SIGINT (Ctrl-C) into a request the loop honours after the current step
(checkpoint, wait until durable, exit 0) or, during startup, before the first step (exit 0, nothing to save); a
second SIGTERM while saving is reported and ignored, a second Ctrl-C aborts at once (exit 130).
`HealthMonitor` reads each step's metrics on the host: it counts skipped (non-finite) updates, names
the batch that caused each, stops the run after K in a row, and reports loss spikes.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import signal
import sys
import threading

from mmjax import storage
from mmjax.errors import RuntimeFault

# The exit status of a run aborted by a second Ctrl-C: 128 + SIGINT, as a shell reports a process killed by it.
ABORT_EXIT_CODE = 130


class NonFiniteError(RuntimeFault, RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient, or an update that would have made the
    state non-finite."""


class PreemptionGuard:
    """While installed, SIGTERM (a preemption notice) and SIGINT (Ctrl-C) set `requested` instead of killing the
    process; the loop honours it after the current step (checkpoint, wait until durable, exit 0), or before the
    first one (nothing to save: exit 0 at once).

    A second SIGTERM is reported and ignored, so a repeated notice cannot kill the save. A second SIGINT aborts at
    once (`os._exit(130)`): a save in progress is left unfinished in Orbax's temporary folder, which is never
    read as a checkpoint (the next run sets it aside), and the message names the newest complete checkpoint in
    `checkpoint_dir`. After a stop was requested the handlers stay installed to the end of the process, so a
    late signal cannot kill it between the durable checkpoint and a clean exit.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, log=print, checkpoint_dir: str | None = None):
        self.requested = False
        self.signal_name: str | None = None  # of the first signal
        self.training = False  # set by the loop once it starts its first step (until then: nothing to save)
        self.log = log
        self.checkpoint_dir = checkpoint_dir
        self._previous: dict[int, object] = {}

    @property
    def reason(self) -> str:
        """How to name the stop in messages: 'preempted' (SIGTERM), 'interrupted' (SIGINT), 'stopped' (another
        process of a multi-process run was signalled)."""
        return {"SIGTERM": "preempted", "SIGINT": "interrupted"}.get(self.signal_name or "", "stopped")

    def _handler(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested:
            if signum == signal.SIGINT:
                self._abort()
            self._say(f"mmjax: {name} again: already stopping after a checkpoint; ignoring it (a second Ctrl-C "
                      f"aborts at once)")
            return
        self.requested, self.signal_name = True, name
        plan = ("finishing this step, then checkpointing and exiting" if self.training else
                "stopping before the first step (nothing to save yet)")
        self._say(f"mmjax: {name} received: {plan}" + (" (Ctrl-C again aborts at once)" if signum == signal.SIGINT
                                                        else ""))

    def _say(self, message: str) -> None:
        """Logs from the signal handler. It runs between two bytecodes of the main thread, which may be inside a
        print of its own: then the message goes straight to stderr instead of raising there."""
        try:
            self.log(message)
            sys.stdout.flush()
        except (RuntimeError, OSError):
            with contextlib.suppress(OSError):
                os.write(2, (message + "\n").encode())

    def _abort(self) -> None:
        folder = self.checkpoint_dir or ""
        try:
            # Orbax writes a checkpoint into a temporary folder and renames it to its step when complete, so the
            # newest folder named by a number is the newest whole checkpoint.
            newest = storage.newest_numbered(folder)
            where = ("no checkpoint is complete yet" if newest is None else
                     f"checkpoint {newest} ({storage.join(folder, str(newest))}) is the newest complete one")
        except Exception:  # noqa: BLE001 - unreadable (a disk or bucket fault): say where to look
            where = f"the newest complete checkpoint is the newest step folder in {folder}"
        message = (f"mmjax: second interrupt: aborting now, without waiting for a checkpoint save in progress; "
                   f"{where}. Run the same command to resume (an unfinished save is set aside then).")
        self._say(message)
        with contextlib.suppress(RuntimeError, OSError):
            sys.stderr.flush()
        os._exit(ABORT_EXIT_CODE)

    def install(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handler)
        return self

    def uninstall(self) -> None:
        """Restores the previous handlers, unless a stop was requested (then they stay: see the class)."""
        if not self.requested:
            for signum, previous in self._previous.items():
                signal.signal(signum, previous)
        self._previous = {}

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc):
        self.uninstall()
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
            norm = float(metrics.get("grad_norm", math.nan))
            if math.isfinite(loss) and math.isfinite(norm):  # then the state the update would produce was not
                what = (f"the update would have made the parameters or optimizer state non-finite (loss "
                        f"{loss}, gradient norm {norm})")
            else:
                what = f"non-finite loss ({loss}) or gradient (norm {norm})"
            self.log(f"mmjax: step {step}: {what}; update skipped ({self.streak} in a row, "
                     f"{self.skipped_total} in all). Batch: {self.batch_description(step)}")
            if self.streak >= self.max_nonfinite:
                raise NonFiniteError(
                    f"{self.streak} consecutive steps (up to step {step}) had a non-finite loss, gradient "
                    f"or updated state (train.max_nonfinite_steps={self.max_nonfinite}); stopping. No "
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
