"""The one training loop.

One batch, start to end:
  grain loader (this process's shard) -> `sharding.global_batch` (global jax.Array on the mesh)
  -> `step.jit_train_step` (jit, sharded in/out, donated state: the task's objective -> optax update)
  -> `MetricsWriter` (JSONL + TensorBoard + progress line) and `Checkpointer` (Orbax, async).
A workdir with checkpoints is resumed from its latest one, data order included.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax

from mmjax import storage
from mmjax.data import pipeline
from mmjax.runtime import distributed
from mmjax.runtime import sharding as shd
from mmjax.runtime.flops import SpeedMeter
from mmjax.training import init_from, lock, preflight
from mmjax.training.checkpoint import Checkpointer, check_location
from mmjax.training.health import HealthMonitor, PreemptionGuard
from mmjax.training.metrics import MetricsWriter, Progress
from mmjax.training.state import StateFactory
from mmjax.training.step import MAX_STEPS_IN_FLIGHT, jit_train_step


def config_to_json(config) -> dict:
    return json.loads(config.to_json_best_effort())


def write_config_json(workdir: str, config_json: dict) -> None:
    """`W/config.json`, written whole or not at all (locally a temporary file and a rename; on a bucket one
    upload). A failed write (a full disk, a read-only workdir) raises StorageError naming config.json."""
    path = storage.join(workdir, "config.json")
    with storage.storage_errors("cannot write the run's config", path):
        storage.write_text_atomic(path, json.dumps(config_json, indent=2))


def evaluate(config, factory: StateFactory, params, mesh, cache: dict | None = None) -> dict[str, float]:
    """The evaluation of `config.task` (`Task.evaluate`), at the end of training and every
    `config.eval.every_steps`. `cache` keeps the evaluation data between calls."""
    return factory.task.evaluate(config, factory.model, params, mesh, factory.rules, {} if cache is None else cache)


def _format(results: dict[str, float]) -> str:
    return ", ".join(f"{k} = {v:.4f}" for k, v in results.items() if k != "step")


def _quiet(*args, **kwargs) -> None:
    return None


class _Timing:
    """input_wait_fraction = time the devices sat idle waiting for input / wall time since compiling."""

    def __init__(self):
        self.wait, self.start = 0.0, None

    def fraction(self) -> float | None:
        return None if self.start is None else self.wait / (time.perf_counter() - self.start)


class TrainingRun:
    """One `mmjax train` in one workdir: set up (mesh, state restored or initialised, loader at its position,
    config.json) in the constructor, once `train` has validated the config and holds the workdir's lock (`run_lock`,
    so only the lock holder sets incomplete checkpoints aside or writes); `run(end)` trains to step `end` and
    returns the last metrics."""

    def __init__(self, config, workdir: str, devices: Sequence[jax.Device], verbose: bool,
                 run_lock: lock.RunLock, guard: PreemptionGuard):
        self.config, self.workdir, self.devices, self.run_lock = config, workdir, list(devices), run_lock
        self.guard = guard  # installed by `train` first: a stop requested while starting ends `run` at once
        self.is_main = jax.process_index() == 0
        self.log: Callable = print if (verbose and self.is_main) else _quiet
        self.warn: Callable = print if self.is_main else _quiet  # problems are shown even when quiet
        storage.makedirs(workdir)
        self.mesh = shd.make_mesh(config.mesh, self.devices)
        self.factory = StateFactory(config, self.mesh)
        self.log(f"mmjax: mesh {dict(self.mesh.shape)} over {len(self.devices)} device(s), "
                 f"{jax.process_count()} process(es); {self.factory.param_count() / 1e6:.2f}M parameters")
        self.ckpt = Checkpointer(storage.join(workdir, "checkpoints"), keep=config.checkpoint.keep,
                                 async_save=config.checkpoint.async_save, log=self.warn)
        self.loader = iter(pipeline.make_train_loader(config, jax.process_index(), jax.process_count(),
                                                      examples=self.factory.task.examples))
        latest, state = self.ckpt.restore_latest(self.factory.abstract, self.loader, log=self.warn)
        if latest is not None:
            self.log(f"mmjax: resumed from {self.ckpt.directory}/{latest}")
        else:  # init_from, and the fine-tuning report
            state = init_from.start(config, self.factory, self.factory.init(config.seed), log=self.log)
        self.state = state
        self.config_json = config_to_json(config)
        if self.is_main:
            write_config_json(workdir, self.config_json)
        self.start = int(jax.device_get(state.step))
        self.writer = MetricsWriter(workdir, enabled=self.is_main)
        self.progress = Progress(config.train.steps, config.train.batch_size, self.start,
                                 enabled=verbose and self.is_main)
        self.speed = SpeedMeter(self.factory.task.flops_per_example(config), self.devices)
        self.health = HealthMonitor(config.train.max_nonfinite_steps, config.train.spike_factor,
                                    config.train.spike_window, config.train.batch_size, log=self.warn)
        self.eval_cache: dict[str, Any] = {}  # evaluation data, loaded once
        self.last: dict[str, Any] = {}

    def _log_step(self, step: int, metrics: dict, timing: _Timing) -> None:
        extra = dict(self.health.counters(), **getattr(self.loader, "stats", dict)())  # data/*
        sps = self.progress.samples_per_second(step)
        if sps == sps:
            extra["samples_per_second"] = sps
            extra.update(self.speed.metrics(sps))
        if step > self.start + 1 and timing.fraction() is not None:
            extra["input_wait_fraction"] = timing.fraction()
        self.last = self.writer.write(step, {**metrics, **extra})
        self.progress.log(step, {**metrics, **extra})

    def _evaluate(self, step: int, timing: _Timing | None = None) -> dict[str, float]:
        """Evaluates the current params and writes the results at `step` (as scalars, with the step)."""
        t_eval = time.perf_counter()
        results = evaluate(self.config, self.factory, self.state.params, self.mesh, self.eval_cache)
        if results:
            results = self.writer.write(step, results)
        if timing is not None:  # speed figures count training only
            self.progress.exclude(time.perf_counter() - t_eval)
            if timing.start is not None:
                timing.start += time.perf_counter() - t_eval
        return results

    def _stop_requested(self, guard: PreemptionGuard, synced: bool) -> bool:
        """Whether to stop now: any process asked (agreed at sync points on multi-process runs)."""
        if jax.process_count() == 1:
            return guard.requested
        return distributed.any_process(guard.requested) if synced else False

    def _stopped_while_starting(self) -> bool:
        """A stop requested while the run started (restoring, preparing data): it ends before compiling."""
        if not self._stop_requested(self.guard, synced=True):
            self.guard.training = True
            return False
        resume = (f"the workdir resumes from checkpoint {self.ckpt.directory}/{self.start}" if self.start else
                  "nothing was trained yet")
        self.warn(f"mmjax: {self.guard.reason}: stopped before step {self.start + 1}/{self.config.train.steps}, "
                  f"while starting: nothing to save; {resume}. Run the same command to resume.")
        return True

    def run(self, end: int) -> dict[str, Any]:
        config, total = self.config, self.config.train.steps
        if self._stopped_while_starting():
            return self.last
        step_fn = jit_train_step(config, self.factory, self.mesh)
        inputs = self.factory.task.inputs(config)  # absent ones unpaired ('audio': {'waveform', 'length'})
        eval_every = int(config.eval.every_steps)
        pending: list[tuple[int, Any]] = []  # (step, device metrics) not yet read on the host
        timing = _Timing()
        guard = self.guard
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.factory.rules):
            for step in range(self.start + 1, end + 1):
                t0 = time.perf_counter()
                host_batch = next(self.loader)
                t1 = time.perf_counter()
                # Steps run asynchronously: waiting for input costs time only if the previous step has
                # finished by the time the batch arrives (then the devices sat idle, at most t1 - t0).
                devices_idle = step > self.start + 1 and self.state.step.is_ready()
                batch = shd.global_batch({k: host_batch[k] for k in inputs if k in host_batch}, self.mesh)
                self.state, metrics = step_fn(self.state, batch)
                pending.append((step, metrics))
                if step == self.start + 1:
                    jax.block_until_ready(metrics)
                    self.progress.mark_compiled(step)
                    timing.start = time.perf_counter()
                elif devices_idle:
                    timing.wait += t1 - t0
                is_log = step % config.train.log_every == 0 or step == end
                is_save = step % config.checkpoint.every_steps == 0 or step == end
                # Read metrics back (a sync point) at logs, saves, and at least every few steps.
                synced = is_log or is_save or len(pending) >= MAX_STEPS_IN_FLIGHT
                if synced:
                    fetched = jax.device_get([m for _, m in pending])
                    for (s, _), m in zip(pending, fetched):
                        self.health.observe(s, m)
                    pending = []
                    if is_log:
                        self._log_step(step, fetched[-1], timing)
                stop = self._stop_requested(guard, synced)
                if eval_every and step % eval_every == 0 and step != total and not stop:
                    results = self._evaluate(step, timing)
                    if results:
                        self.log(f"mmjax: eval at step {step}: " + _format(results))
                if is_save or stop:
                    self.run_lock.check()  # another run took the workdir over: write nothing more
                    self.ckpt.save(step, self.state, self.loader, self.config_json, force=stop)
                if stop:
                    self.ckpt.wait()
                    self.warn(f"mmjax: {guard.reason}: stopped after step {step}/{total}; checkpoint "
                              f"{self.ckpt.directory}/{step} is durable. Run the same command to resume.")
                    return self.last
            self.ckpt.wait()
            if end == total:
                results = self._evaluate(end)
                if results:
                    self.last.update(results)
                    self.log("mmjax: " + _format(results))
        return self.last

    def close(self) -> None:
        self.ckpt.close()
        self.writer.close()


def train(config, workdir: str, devices: Sequence[jax.Device] | None = None,
          stop_at_step: int | None = None, verbose: bool = True, force_unlock: bool = False) -> dict[str, Any]:
    """Trains `config` in `workdir` (resuming if it holds checkpoints), holding the workdir's lock
    (`mmjax.training.lock`) from before anything is read or written there to the end. Returns the last metrics.

    stop_at_step: end early after this step, with a checkpoint written (for tests and time-boxed jobs).
    force_unlock: take over the workdir's lock even if another run seems to hold it.
    Raises ConfigError / CheckpointMismatchError before compiling, WorkdirLockedError (before compiling) when
    another run holds the workdir, CheckpointWriteError when storage fails, NonFiniteError after
    `train.max_nonfinite_steps` non-finite steps in a row.
    """
    devices = jax.devices() if devices is None else devices
    total = config.train.steps
    warn = print if jax.process_index() == 0 else _quiet
    # From here on SIGTERM and Ctrl-C stop the run cleanly (health.PreemptionGuard), also while it starts.
    checkpoint_dir = storage.join(workdir, "checkpoints")
    with PreemptionGuard(log=warn, checkpoint_dir=checkpoint_dir) as guard:
        check_location(checkpoint_dir)
        storage.reachable(workdir, "workdir")
        preflight.check(config, len(devices), jax.process_count())
        with lock.hold(workdir, force=force_unlock, log=warn) as run_lock:
            run = TrainingRun(config, workdir, devices, verbose, run_lock, guard)
            try:
                return run.run(total if stop_at_step is None else min(stop_at_step, total))
            finally:
                run.close()
