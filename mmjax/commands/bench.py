"""`mmjax bench`: a config's train step, timed on this host's devices with a synthetic batch.

    mmjax bench --config configs/clip_vit_b16.py --config.train.batch_size=512 --steps 20
    mmjax bench --config configs/clip_vit_b32.py --config.model.dtype=float32 --config.model.remat=none \
        --config.train.batch_size=32 --steps 3 --warmup 1

The state and the step are built as `mmjax train` builds them (`StateFactory`, `train.jit_train_step`: the same
mesh, shardings and donation), compiled ahead of time, then run on one fixed batch of random inputs that lives
on the devices, so the figures are the step's own, not the input pipeline's: images N(0, 1), token ids with
random lengths, waveforms, labels (`synthetic_batch`). Reported: compile time; XLA's memory per device
(arguments, outputs, temporaries, aliased) and, where the backend counts it, the device's peak memory; the
median and spread of `--steps` timed steps after `--warmup` untimed ones (each step is waited for, so a step's
time is its own); samples/s, TFLOP/s per device and MFU (`mmjax.runtime.flops`: the analytic model FLOPs against the
chip's peak, or the measured matmul peak on a CPU); XLA's own FLOP count of the step beside the analytic one.
`--json FILE` writes the same figures.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from mmjax import storage
from mmjax.errors import ConfigError
from mmjax.runtime import distributed
from mmjax.runtime import sharding as shd
from mmjax.runtime.flops import SpeedMeter, cost_analysis, memory_bytes
from mmjax.tasks import get_task
from mmjax.training import preflight
from mmjax.training.state import StateFactory
from mmjax.training.step import MAX_STEPS_IN_FLIGHT, jit_train_step


def synthetic_batch(config, batch_size: int, seed: int = 0, start: int = 0) -> dict[str, np.ndarray]:
    """Random host inputs of `config`'s train step (its task's `inputs`), shaped as its `step_batch`:
    'image' float32 [B, H, W, C] ~ N(0, 1); 'text' int32 [B, L], ids in [3, vocab) over a random length in
    [2, L] and pad (0) after it; 'audio' float32 [B, T] ~ N(0, 0.1); 'label' int32 [B] in [0, classes); 'codes'
    int32 [B, N] in [0, model.vq.codebook_size) (pre-tokenised images).

    Examples start..start+B-1 of one endless synthetic data set: example i is drawn from its own generator
    (seed, i), so a process that builds only its slice of a global batch gets the same rows as one process
    building it all."""
    task = get_task(config)
    shapes = {k: v.shape[1:] for k, v in task.step_batch(config, 1).items()}
    rows = {key: [] for key in task.inputs(config)}
    for index in range(start, start + batch_size):
        rng = np.random.default_rng((seed, index))
        for key, column in rows.items():
            if key == "image":
                column.append(rng.normal(size=shapes[key]).astype(np.float32))
            elif key == "text":
                (length,) = shapes[key]
                ids = rng.integers(3, config.model.text.vocab_size, size=length).astype(np.int32)
                ids[rng.integers(2, length + 1):] = 0
                column.append(ids)
            elif key == "audio":
                column.append((0.1 * rng.normal(size=shapes[key])).astype(np.float32))
            elif key == "label":
                column.append(np.int32(rng.integers(0, config.model.fusion.num_classes)))
            elif key == "codes":  # pre-tokenised images (data.codes_dir): codes of the image tokenizer
                column.append(rng.integers(0, config.model.vq.codebook_size, size=shapes[key]).astype(np.int32))
            else:
                raise ValueError(f"mmjax bench: no synthetic input for the step's batch key {key!r}")
    return {key: np.stack(column) for key, column in rows.items()}


class StepTimer:
    """`config`'s train step on `devices` (default: all), compiled for a fixed on-device synthetic batch.

    `run(n)` runs n steps (advancing the state) and returns their wall seconds, waiting for the last one;
    `step_seconds(n)` times n steps one by one. `compiled` is the AOT-compiled step (memory and cost analysis).
    """

    def __init__(self, config, devices=None, seed: int = 0):

        self.devices = list(jax.devices() if devices is None else devices)
        preflight.check(config, len(self.devices), jax.process_count())
        self.mesh = shd.make_mesh(config.mesh, self.devices)
        self.factory = StateFactory(config, self.mesh)
        self.state = self.factory.init(config.seed)
        per_process = config.train.batch_size // jax.process_count()  # this process's rows of the global batch
        host = synthetic_batch(config, per_process, seed, start=jax.process_index() * per_process)
        with jax.set_mesh(self.mesh):
            self.batch = shd.global_batch(host, self.mesh)
        t0 = time.perf_counter()
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.factory.rules):
            self.compiled = jit_train_step(config, self.factory, self.mesh).lower(self.state, self.batch).compile()
        self.compile_seconds = time.perf_counter() - t0
        self.metrics: dict[str, Any] = {}

    def run(self, n: int) -> float:
        """Runs n steps back to back; wall seconds until the last one has finished (0 steps: 0). Like training,
        it waits for a step at least every `train.MAX_STEPS_IN_FLIGHT` steps."""
        t0 = time.perf_counter()
        metrics = None
        with jax.set_mesh(self.mesh):
            for i in range(n):
                self.state, metrics = self.compiled(self.state, self.batch)
                if (i + 1) % MAX_STEPS_IN_FLIGHT == 0:
                    jax.block_until_ready(metrics)
            jax.block_until_ready(metrics)
        if metrics is not None:
            self.metrics = jax.device_get(metrics)
        return time.perf_counter() - t0

    def step_seconds(self, n: int) -> list[float]:
        """Wall seconds of each of n steps, each waited for before the next starts."""
        return [self.run(1) for _ in range(n)]


def _xla_flops(compiled) -> float | None:

    flops = cost_analysis(compiled).get("flops")
    return None if flops is None or flops < 0 else float(flops)


def measure(config, steps: int, warmup: int, devices=None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Builds, compiles and times `config`'s train step; returns the report (see the module docstring)."""
    if steps < 1 or warmup < 0:
        raise ConfigError([f"mmjax bench: --steps must be >= 1 and --warmup >= 0; got {steps} and {warmup}"])
    timer = StepTimer(config, devices)
    devices = timer.devices
    log(f"mmjax bench: {len(devices)} {devices[0].platform} device(s) ({devices[0].device_kind}), mesh "
        f"{dict(timer.mesh.shape)}, {timer.factory.param_count() / 1e6:.1f}M parameters, global batch "
        f"{config.train.batch_size}; compiled in {timer.compile_seconds:.1f} s")
    log(f"mmjax bench: {warmup} warm-up step(s), then {steps} timed")
    timer.run(warmup)
    seconds = timer.step_seconds(steps)
    median = statistics.median(seconds)
    samples_per_second = config.train.batch_size / median
    meter = SpeedMeter(timer.factory.task.flops_per_example(config), devices)
    speed = meter.metrics(samples_per_second)
    xla_flops = _xla_flops(timer.compiled)  # per device: the compiled SPMD program is one device's
    analytic_per_device = meter.flops_per_example * config.train.batch_size / len(devices)
    report: dict[str, Any] = dict(
        platform=devices[0].platform, device_kind=devices[0].device_kind, devices=len(devices),
        processes=jax.process_count(), mesh=dict(timer.mesh.shape), params=timer.factory.param_count(),
        global_batch=int(config.train.batch_size), dtype=str(config.model.dtype),
        compile_seconds=timer.compile_seconds, warmup_steps=warmup, step_seconds=seconds,
        median_step_seconds=median, samples_per_second=samples_per_second,
        model_flops_per_example=meter.flops_per_example, peak_flops_per_device=meter.peak,
        tflops_per_device=speed["tflops_per_device"], mfu=speed.get("mfu"),
        xla_flops_per_device=xla_flops, model_flops_per_device=analytic_per_device,
        xla_counts_scan_body_once=bool(config.model.scan_layers),
        loss=float(timer.metrics["loss"]) if "loss" in timer.metrics else None,
        memory_bytes_per_device=memory_bytes(timer.compiled),
    )
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
    if peaks and None not in peaks:  # GPUs and TPUs count it; the CPU does not
        report["device_peak_bytes"] = max(int(p) for p in peaks)
    return report


def format_report(r: dict[str, Any]) -> str:
    gib = lambda b: f"{b / 2 ** 30:.2f} GiB" if b >= 2 ** 30 else f"{b / 2 ** 20:.1f} MiB"  # noqa: E731
    mem = r["memory_bytes_per_device"]
    spread = f"{min(r['step_seconds']):.3f}-{max(r['step_seconds']):.3f}"
    mfu = "unknown (no peak for this device kind)" if r["mfu"] is None else f"{100 * r['mfu']:.1f} %"
    peak = "?" if r["peak_flops_per_device"] is None else f"{r['peak_flops_per_device'] / 1e12:.3g}"
    lines = [
        f"  step: median {r['median_step_seconds']:.3f} s over {len(r['step_seconds'])} steps ({spread} s); "
        f"{r['samples_per_second']:.1f} samples/s; loss {r['loss']:.4f}",
        f"  {r['tflops_per_device']:.3f} TFLOP/s per device of a {peak} TFLOP/s peak: MFU {mfu}",
        f"  model FLOPs per device and step {r['model_flops_per_device']:.4g} (analytic, 3x forward), XLA counts "
        + ("?" if r["xla_flops_per_device"] is None else f"{r['xla_flops_per_device']:.4g}")
        + ("; XLA counts each scanned layer stack as ONE layer" if r["xla_counts_scan_body_once"] else ""),
        f"  memory per device (XLA): arguments {gib(mem['argument'])}, outputs {gib(mem['output'])}, temporaries "
        f"{gib(mem['temp'])}, aliased {gib(mem['alias'])}"
        + (f"; device peak {gib(r['device_peak_bytes'])} (the most of this host's devices)"
           if "device_peak_bytes" in r else ""),
    ]
    return "\n".join(lines)


def run(config, steps: int, warmup: int, json_path: str | None = None) -> int:
    """The `mmjax bench` command: prints the report (host 0) and writes it as JSON."""
    log = print if jax.process_index() == 0 else (lambda *a, **k: None)
    report = measure(config, steps, warmup, log=log)
    log(format_report(report))
    if json_path and jax.process_index() == 0:
        storage.write_text_atomic(json_path, json.dumps(report, indent=2))  # a local path or a bucket URL
    return 0


def main(config, args) -> int:
    """`mmjax bench`: joins the cluster as `mmjax train` does, then times the step."""
    distributed.initialize()
    return run(config, args.steps, args.warmup, args.json)
