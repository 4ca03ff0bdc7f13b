"""Ahead-of-time compilation of the real train step for a TPU topology, from any host.

`mmjax compile --config C --topology v5p-256` builds the mesh from compile-only devices that libtpu
describes for that slice (no TPU attached: `jax.experimental.topologies.get_topology_desc`), lowers
the jitted train step of `mmjax.training.loop` with abstract inputs (`jax.ShapeDtypeStruct`s carrying their
shardings; no array is allocated) and compiles it with the TPU compiler. It reports what one chip
holds (arguments, outputs, temporaries, aliased bytes: `compiled.memory_analysis()`), the FLOPs of a
step (`compiled.cost_analysis()`, per chip and in all) and whether the step fits the chip's HBM.

For a generative task (one whose `Task.sampler` is not None: coca, prefix_lm, flamingo, text_to_image) it
compiles its generation program too, on the same mesh with the same parameter shardings: media encoding,
prompt prefill and the KV-cached token loop for `--sample-batch` rows (default train.batch_size), and reports
its memory per chip the same way. The command succeeds only when both fit.

Topology names are Cloud TPU accelerator types: `v4-N` and `v5p-N` count TensorCores (2 per chip,
one megacore device per chip); `v5e-N` (alias `v5litepod-N`) and `v6e-N` count chips.
Needs libtpu (`pip install -e ".[tpu]"`); with libtpu installed, ordinary CPU runs need
`JAX_PLATFORMS=cpu`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding

from mmjax import storage
from mmjax.errors import MmjaxError
from mmjax.runtime import sharding as shd
from mmjax.runtime.flops import cost_analysis, memory_bytes
from mmjax.runtime.sharding import make_mesh
from mmjax.tasks import get_task
from mmjax.training import preflight
from mmjax.training import step as train_lib
from mmjax.training.state import StateFactory

GiB = 1024 ** 3


class LibtpuMissing(MmjaxError, RuntimeError):
    """libtpu is not installed: it holds the TPU compiler."""


class TopologyError(MmjaxError, ValueError):
    """--topology or --num-slices names no slice mmjax can compile for (exit 2)."""


def use_cpu_host() -> None:
    """Runs the host's own work on CPU (libtpu would otherwise look for an attached TPU); TPU devices
    are compile-only. An explicit JAX_PLATFORMS is respected."""
    if not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", "cpu")


def reserve_cpu_devices(n: int) -> None:
    """Asks for `n` CPU devices before the CPU backend starts (checking the config may start it: tracing the model
    asks JAX for its default backend); a no-op once it runs."""
    try:
        jax.config.update("jax_num_cpu_devices", max(n, jax.config.jax_num_cpu_devices))
    except RuntimeError:  # the CPU backend is already running; use what it has
        pass


def _host_mesh_like(mesh):
    """A CPU mesh of `mesh`'s shape. `StateFactory` runs small eager ops (its init key) under its
    mesh, which compile-only TPU devices cannot execute; it is built on this twin and its shardings
    are moved to the TPU mesh. Needs as many CPU devices: asks for them before the backend starts."""
    n = mesh.devices.size
    reserve_cpu_devices(n)
    cpu = jax.devices("cpu")
    if len(cpu) < n:
        raise LibtpuMissing(f"the CPU backend started with {len(cpu)} devices before `mmjax compile` could "
                            f"ask for {n}; run the compile in a fresh process")
    grid = np.asarray(cpu[:n], dtype=object).reshape(mesh.devices.shape)
    return Mesh(grid, mesh.axis_names, axis_types=mesh.axis_types)


@dataclasses.dataclass(frozen=True)
class Generation:
    """One TPU generation: libtpu's name, devices per chip, HBM per chip, and whether its ICI is 3-D."""

    libtpu_name: str
    chip_config: str  # 'megacore' (one device = two TensorCores) or 'default'
    hbm_bytes: int
    three_d: bool
    names_count_cores: bool  # v4-8 / v5p-8 count TensorCores: 8 cores = 4 chips


GENERATIONS = {
    "v4": Generation("v4", "megacore", 32 * GiB, True, True),
    "v5p": Generation("v5p", "megacore", 95 * GiB, True, True),
    "v5e": Generation("v5e", "default", 16 * GiB, False, False),
    "v6e": Generation("v6e", "default", 32 * GiB, False, False),
}
_ALIASES = {"v5litepod": "v5e", "v6litepod": "v6e"}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A parsed accelerator type: `name` e.g. 'v5p-256', its chips and their ICI grid."""

    name: str
    generation: Generation
    chips: int
    shape: tuple[int, ...]  # chips along each ICI axis
    wrap: tuple[bool, bool, bool]  # torus wrap-around links per axis
    chips_per_host: tuple[int, int, int]

    @property
    def libtpu_topology(self) -> str:
        return f"{self.generation.libtpu_name}:{'x'.join(map(str, self.shape))}"


def _grid_3d(chips: int) -> tuple[int, int, int]:
    """v4/v5p slice shapes: 4 -> 2x2x1, 8 -> 2x2x2, 16 -> 2x2x4, 32 -> 2x4x4, 64 -> 4x4x4, 128 -> 4x4x8..."""
    if chips < 4:
        return (chips, 1, 1)
    shape = [2, 2, 1]
    while math.prod(shape) < chips:
        smallest = min(shape)
        i = max(j for j, s in enumerate(shape) if s == smallest)
        shape[i] *= 2
    return tuple(shape)


def _grid_2d(chips: int) -> tuple[int, int]:
    """v5e/v6e slice shapes: 1 -> 1x1, 4 -> 2x2, 8 -> 2x4, 16 -> 4x4, 32 -> 4x8, ..., 256 -> 16x16."""
    shape = [1, 1]
    while math.prod(shape) < chips:
        shape[0 if shape[0] < shape[1] else 1] *= 2
    return tuple(shape)


def parse_topology(name: str) -> Topology:
    """'v5p-256' -> Topology(v5p, 128 chips, 4x4x8). Raises TopologyError (a ValueError) for unknown names/sizes."""
    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e|v6litepod)-(\d+)", name.strip().lower())
    if not m:
        raise TopologyError(f"--topology {name!r}: expected v4-N, v5p-N, v5e-N (v5litepod-N) or v6e-N, "
                            f"e.g. v5p-256 or v6e-256")
    gen_name = _ALIASES.get(m.group(1), m.group(1))
    gen, n = GENERATIONS[gen_name], int(m.group(2))
    chips = n // 2 if gen.names_count_cores else n
    if n <= 0 or (gen.names_count_cores and n % 2) or chips & (chips - 1):
        raise TopologyError(f"--topology {name!r}: {gen_name} slices have a power-of-two number of "
                            f"{'TensorCores (2 per chip)' if gen.names_count_cores else 'chips'}")
    if gen.three_d:
        shape = _grid_3d(chips)
        wrap = (chips >= 64,) * 3  # full cubes (4x4x4 and up) are tori
        per_host = (2, 2, 1) if chips >= 4 else (chips, 1, 1)
    else:
        shape = _grid_2d(chips)
        wrap = (chips >= 256, chips >= 256, False)
        per_host = (2, 2, 1) if chips >= 16 or chips == 4 else (shape[0], shape[1], 1)
    return Topology(f"{gen_name}-{n}", gen, chips, shape, wrap, per_host)


def topology_devices(topo: Topology, num_slices: int = 1) -> list:
    """Compile-only TPU devices of `num_slices` slices of `topo` (needs libtpu, no TPU)."""
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # not on a TPU VM: do not ask GCE metadata
    # Compile-only: no chip is opened, so several compiles may share the host (libtpu's lockfile).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        import libtpu  # noqa: F401
    except ImportError as e:
        raise LibtpuMissing("mmjax compile needs libtpu: pip install -e '.[tpu]' "
                           "(and run ordinary CPU jobs with JAX_PLATFORMS=cpu)") from e

    # What a TPU VM's metadata would say; without it libtpu logs alarming (harmless) errors.
    host_env = dict(TPU_ACCELERATOR_TYPE=topo.name, TPU_WORKER_HOSTNAMES="localhost", TPU_WORKER_ID="0")
    saved = {k: os.environ.get(k) for k in host_env}
    os.environ.update({k: v for k, v in host_env.items() if saved[k] is None})
    try:
        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=topo.libtpu_topology,
            chip_config_name=topo.generation.chip_config, chips_per_host_bounds=topo.chips_per_host,
            num_slices=num_slices, wrap=topo.wrap)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
    return list(desc.devices)


def topology_mesh(mesh_cfg, devices: list, num_slices: int = 1):
    """The ("data", "fsdp", "tensor") mesh over TPU devices, laid out along the ICI torus: the one mesh
    builder, `mmjax.runtime.sharding.make_mesh` ("data" spans the slices over DCN when there are several)."""
    return make_mesh(mesh_cfg, devices, num_slices=num_slices)


def lower_train_step(config, mesh):
    """The jitted train step of `mmjax.training.step`, lowered with abstract sharded inputs. Returns
    (lowered, factory)."""
    factory = StateFactory(config, _host_mesh_like(mesh))
    to_tpu = lambda s: NamedSharding(mesh, s.spec)  # noqa: E731
    factory.mesh = mesh
    factory.shardings = jax.tree.map(to_tpu, factory.shardings)
    factory.abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), factory.abstract,
        factory.shardings)
    batch_sharding = shd.batch_sharding(mesh)
    b = config.train.batch_size
    shapes = get_task(config).step_batch(config, b)
    batch = {k: jax.ShapeDtypeStruct(shapes[k].shape, shapes[k].dtype, sharding=batch_sharding)
             for k in train_lib.step_inputs(config)}
    step_fn = train_lib.jit_train_step(config, factory, mesh)  # the step exactly as training jits it
    with jax.set_mesh(mesh), nn.logical_axis_rules(factory.rules):
        lowered = step_fn.lower(factory.abstract, batch)
    return lowered, factory


def lower_sampler(config, mesh, factory, batch_size: int):
    """The task's generation program (`Task.sampler`) jitted over `mesh` with the train state's parameter
    shardings and its inputs split over the batch axes, lowered abstractly. Returns (lowered, sampler), or None
    when the task does not generate."""
    sampler = get_task(config).sampler(config, factory.model, batch_size)
    if sampler is None:
        return None
    batch_sharding = shd.batch_sharding(mesh)
    inputs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=batch_sharding), sampler.inputs)
    params = factory.abstract.params
    fn = jax.jit(sampler.fn, in_shardings=(factory.shardings.params, jax.tree.map(lambda _: batch_sharding, inputs)))
    with jax.set_mesh(mesh), nn.logical_axis_rules(factory.rules):
        return fn.lower(params, inputs), sampler


def _compile(lowered):
    """lowered.compile(), or (None, the compiler's message) when the TPU compiler ran out of HBM."""
    try:
        return lowered.compile(), None
    except Exception as e:  # noqa: BLE001  (jax.errors.JaxRuntimeError; only HBM exhaustion is handled)
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return None, str(e)


def model_flops_per_step(config) -> float:
    """FLOPs of one training step by the usual model count (as in MFU): the task's `flops_per_example`
    times the global batch (3x the forward matmuls, attention included, rematerialisation not counted)."""
    return float(get_task(config).flops_per_example(config) * config.train.batch_size)


def analyse(compiled, topo: Topology, num_devices: int) -> dict[str, Any]:
    """Per-chip memory, FLOPs and the HBM verdict of a compiled SPMD step (figures are per device;
    v4/v5p megacore and v5e/v6e both have one device per chip)."""
    mem = memory_bytes(compiled)
    args, outs, temps, alias, code = (mem[k] for k in ("argument", "output", "temp", "alias", "code"))
    per_chip = args + outs - alias + temps + code
    flops_chip = float(cost_analysis(compiled).get("flops", float("nan")))
    hbm = topo.generation.hbm_bytes
    return dict(
        argument_bytes=args, output_bytes=outs, temp_bytes=temps, alias_bytes=alias,
        code_bytes=code, bytes_per_chip=per_chip, hbm_bytes_per_chip=hbm,
        hbm_fraction=per_chip / hbm, fits=bool(per_chip <= hbm),
        flops_per_chip=flops_chip, flops_per_step=flops_chip * num_devices,
    )


def compile_for_topology(config, topology: str, num_slices: int = 1,
                         sample_batch: int | None = None) -> dict[str, Any]:
    """Compiles `config`'s train step for `num_slices` slices of `topology`, and a generative task's sampler
    for `sample_batch` rows (None: train.batch_size; 0: not compiled). Returns the report dict (see `analyse`)
    plus topology, mesh, parameter count and timings, and under 'sampler' the sampler's. Raises ConfigError
    before compiling when the config does not suit the devices."""
    topo = parse_topology(topology)
    if num_slices < 1:
        raise TopologyError(f"--num-slices must be >= 1, got {num_slices}")
    devices = topology_devices(topo, num_slices)
    reserve_cpu_devices(len(devices))
    preflight.check(config, len(devices), 1, reads_init_from=False)  # compiling loads no weights
    mesh = topology_mesh(config.mesh, devices, num_slices)
    t0 = time.perf_counter()
    lowered, factory = lower_train_step(config, mesh)
    t1 = time.perf_counter()
    compiled, oom = _compile(lowered)
    t2 = time.perf_counter()
    report = dict(
        topology=topo.name, libtpu_topology=topo.libtpu_topology, num_slices=num_slices,
        chips=topo.chips * num_slices, devices=len(devices), device_kind=devices[0].device_kind,
        mesh=dict(mesh.shape), global_batch=int(config.train.batch_size),
        params=factory.param_count(), lower_seconds=round(t1 - t0, 2), compile_seconds=round(t2 - t1, 2),
    )
    report.update(analyse(compiled, topo, len(devices)) if compiled is not None else
                  out_of_memory(oom, topo))
    model_flops = model_flops_per_step(config)
    report.update(model_flops_per_step=model_flops, model_flops_per_chip=model_flops / len(devices),
                  # XLA's cost analysis counts a while loop's body once: scanned layers count as one.
                  xla_counts_scan_body_once=bool(config.model.scan_layers))
    rows = int(config.train.batch_size if sample_batch is None else sample_batch)
    sampling = lower_sampler(config, mesh, factory, rows) if rows > 0 else None
    if sampling is not None:
        t0 = time.perf_counter()
        compiled, oom = _compile(sampling[0])
        report["sampler"] = dict(what=sampling[1].what, batch=rows,
                                 compile_seconds=round(time.perf_counter() - t0, 2),
                                 **(analyse(compiled, topo, len(devices)) if compiled is not None else
                                    out_of_memory(oom, topo)))
    return report


def fits(report: dict[str, Any]) -> bool:
    """Whether the train step (and the sampler, when compiled) fit the chip's HBM."""
    return bool(report["fits"] and report.get("sampler", {}).get("fits", True))


_SIZE = r"([\d.]+)\s*([KMGTP]?)i?B?"
_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40, "P": 2 ** 50}


def _bytes(number: str, unit: str) -> int:
    return int(float(number) * _UNITS[unit])


def out_of_memory(message: str, topo: Topology) -> dict[str, Any]:
    """The report of a step the TPU compiler refused for lack of HBM: fits=False, and the bytes the
    compiler said it needed (`bytes_per_chip`, a lower bound when it names only part of the memory).
    The memory breakdown and FLOPs are unknown (None)."""
    needed = None
    m = re.search(r"Used " + _SIZE + r" of " + _SIZE + r" hbm", message)
    if m:
        needed = _bytes(m.group(1), m.group(2))
    else:
        m = re.search(r"required for [^(]*\(" + _SIZE + r"\)", message)
        if m:
            needed = _bytes(m.group(1), m.group(2))
    hbm = topo.generation.hbm_bytes
    first_line = message.strip().splitlines()[0] if message.strip() else message
    return dict(
        argument_bytes=None, output_bytes=None, temp_bytes=None, alias_bytes=None, code_bytes=None,
        bytes_per_chip=needed, hbm_bytes_per_chip=hbm,
        hbm_fraction=None if needed is None else needed / hbm, fits=False,
        flops_per_chip=None, flops_per_step=None, compile_error=first_line[:2000],
    )


def _gib(b) -> str:
    return "?" if b is None else f"{b / GiB:.2f} GiB"


def _memory_lines(r: dict[str, Any]) -> list[str]:
    """The per-chip memory lines of a train step's or a sampler's report."""
    g, verdict = _gib, "fits" if r["fits"] else "DOES NOT FIT"
    if "compile_error" in r:
        return [f"  the TPU compiler ran out of HBM: {r['compile_error']}",
                f"  per chip: needs at least {g(r['bytes_per_chip'])} of {g(r['hbm_bytes_per_chip'])} "
                f"HBM -> {verdict}"]
    return [f"  per chip: arguments {g(r['argument_bytes'])}, outputs {g(r['output_bytes'])}, "
            f"temporaries {g(r['temp_bytes'])}, aliased {g(r['alias_bytes'])}, code {g(r['code_bytes'])}",
            f"  per chip total: {g(r['bytes_per_chip'])} of {g(r['hbm_bytes_per_chip'])} HBM "
            f"({100 * r['hbm_fraction']:.0f}%) -> {verdict}"]


def format_report(r: dict[str, Any]) -> str:
    mesh = " x ".join(f"{k}={v}" for k, v in r["mesh"].items())
    lines = [
        f"mmjax compile: {r['topology']} x{r['num_slices']} slice(s) ({r['libtpu_topology']}, "
        f"{r['chips']} chips, {r['device_kind']}), mesh {mesh}",
        f"  model: {r['params'] / 1e6:.1f}M parameters, global batch {r['global_batch']}; "
        f"lowered in {r['lower_seconds']:.1f}s, compiled in {r['compile_seconds']:.1f}s",
    ]
    lines += _memory_lines(r)
    if "compile_error" not in r:
        lines.append(f"  FLOPs per step (XLA cost analysis): {r['flops_per_step']:.4g} "
                     f"({r['flops_per_chip']:.4g} per chip)" + ("; counts each scanned layer stack as ONE layer"
                                                                if r.get("xla_counts_scan_body_once") else ""))
    lines.append(f"  FLOPs per step (model count, 3x forward): {r['model_flops_per_step']:.4g} "
                 f"({r['model_flops_per_chip']:.4g} per chip)")
    if "sampler" in r:
        s = r["sampler"]
        lines.append(f"  sampler ({s['batch']} rows: {s['what']}), compiled in {s['compile_seconds']:.1f}s:")
        lines += ["  " + line for line in _memory_lines(s)]
    return "\n".join(lines)


def run(config, topology: str, num_slices: int = 1, json_path: str | None = None,
        sample_batch: int | None = None) -> int:
    """The `mmjax compile` command: prints the report, writes it as JSON, returns 0 if all fits else 1."""
    try:
        report = compile_for_topology(config, topology, num_slices, sample_batch)
    except LibtpuMissing as e:
        print(f"mmjax: error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    if json_path:
        storage.write_text_atomic(json_path, json.dumps(report, indent=2))  # a local path or a bucket URL
    return 0 if fits(report) else 1


def main(config, args) -> int:
    """`mmjax compile`: the host's own work on CPU, then the ahead-of-time compile for the topology."""
    use_cpu_host()
    return run(config, args.topology, args.num_slices, args.json, args.sample_batch)
