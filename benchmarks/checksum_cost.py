"""The cost of verified checkpoints: checksumming a train state against saving it with Orbax.

Builds the ViT-B/16 CLIP train state (configs/clip.py:B/16: f32 parameters + AdamW's mu and nu, about 150M
values each) on one CPU device with random values, with the bound the train step would carry for them (measured:
`TrainState.bound`), then alternates, `--repeats` times:
  checksum  `integrity.summarize` as a save of a state from the train step computes it (every leaf's two 32-bit
            checksums; the bound proves the state finite, so no NaN/Inf read), then, for comparison, with the
            NaN/Inf read (a state the bound does not prove finite: restored, or changed by hand)
  Orbax     an Orbax save of the same state alone (the handler mmjax uses, synchronous: until durable)
  mmjax     `Checkpointer.save` (checksums, then the Orbax save with the record), synchronous
each into a fresh folder after an `os.sync()` (no save is slowed by the write-back of the one before), the three
taking turns at going first; then, once, a verified restore (`Checkpointer.restore`: read + checksums +
comparison). Prints the medians and the checksum's share of a save (the target: under 10 %), and writes them as
JSON with `--out`.

    python benchmarks/checksum_cost.py --repeats 3
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

from mmjax import config as config_lib  # noqa: E402
from mmjax.runtime import sharding as shd  # noqa: E402
from mmjax.training import integrity  # noqa: E402
from mmjax.training.checkpoint import Checkpointer, _state_handler  # noqa: E402
from mmjax.training.optim import measure_bound  # noqa: E402
from mmjax.training.state import StateFactory  # noqa: E402


def build_state(config_arg: str):
    config = config_lib.load_config_file(os.path.join(ROOT, "configs", "clip.py") + ":" + config_arg)
    config.unlock()
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 1, 1
    config.lock()
    factory = StateFactory(config, shd.make_mesh(config.mesh, jax.devices()[:1]))
    state = factory.init(0)
    # Adam's moments start at zero; give them values so that the checksums read real data (nu >= 0, as Adam's).
    key = jax.random.key(1)
    opt = jax.tree.map(lambda x: jax.random.normal(key, x.shape, x.dtype) if x.ndim else x, state.opt_state)
    opt = opt_with_nonnegative_nu(opt)
    # The bound the train step would carry for these values (measured, as the step measures a checked update):
    # a save of a state from the step then skips the NaN/Inf read (`TrainState.proven_finite`).
    return factory, state.replace(opt_state=opt, bound=jax.jit(measure_bound)(state.params, opt))


def opt_with_nonnegative_nu(opt):
    adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
    return jax.tree.map(lambda x: x._replace(nu=jax.tree.map(abs, x.nu)) if adam(x) else x, opt, is_leaf=adam)


def timed(fn, cpu: list | None = None):
    """(wall seconds, result); appends the process's CPU seconds (all threads) to `cpu` if given."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    if cpu is not None:
        cpu.append(time.process_time() - c0)
    return time.perf_counter() - t0, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="B/16", help="the configs/clip.py variant")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="where the saves go (default: a temporary folder, removed)")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)
    factory, train_state = build_state(args.config)
    assert train_state.proven_finite(), "the measured bound should prove the state finite"
    state = train_state.saved()  # what a checkpoint holds (no TrainState.bound)
    jax.block_until_ready(state)
    values = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
    leaves = len(jax.tree.leaves(state))
    print(f"checksum_cost: {args.config} train state: {leaves} arrays, {values / 1e6:.0f}M values, "
          f"{nbytes / 2**30:.2f} GiB, on {jax.devices()[0].platform} ({os.cpu_count()} CPU(s))", flush=True)
    compile_and_first, _ = timed(lambda: integrity.summarize(state, known_finite=True))
    integrity.summarize(state)  # compiled with the NaN/Inf read too
    base = args.dir or tempfile.mkdtemp(prefix="mmjax_checksum_cost_")
    checksum, checksum_read, orbax_save, save, cpu_checksum, cpu_orbax = [], [], [], [], [], []

    def orbax_alone(i):
        plain = ocp.CheckpointManager(os.path.join(base, f"orbax{i}"), item_handlers={"state": _state_handler()},
                                      options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False))
        orbax_save.append(timed(lambda: plain.save(1, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state))),
                                cpu_orbax)[0])
        plain.close()
        shutil.rmtree(os.path.join(base, f"orbax{i}"))

    def mmjax_save(i):
        ckpt = Checkpointer(os.path.join(base, f"run{i}"), keep=0, async_save=False, log=lambda s: None)
        save.append(timed(lambda: ckpt.save(1, train_state, force=True))[0])
        ckpt.close()
        if i:
            shutil.rmtree(os.path.join(base, f"run{i}"))

    def checksum_alone(i):
        checksum.append(timed(lambda: integrity.summarize(state, known_finite=True), cpu_checksum)[0])
        checksum_read.append(timed(lambda: integrity.summarize(state))[0])

    for i in range(args.repeats):
        order = [checksum_alone, orbax_alone, mmjax_save]
        for run in order[i % 3:] + order[:i % 3]:  # each goes first, second and third in turn
            gc.collect()
            os.sync()  # no save is slowed by the write-back of the one before
            run(i)
        print(f"  round {i + 1}: checksum {checksum[-1]:.2f} s ({cpu_checksum[-1]:.2f} CPU-s; with the NaN/Inf "
              f"read {checksum_read[-1]:.2f} s), Orbax save "
              f"{orbax_save[-1]:.2f} s ({cpu_orbax[-1]:.2f} CPU-s), mmjax save (checksum + Orbax) {save[-1]:.2f} s",
              flush=True)
    ckpt = Checkpointer(os.path.join(base, "run0"), async_save=False, read_only=True, log=lambda s: None)
    restore, _ = timed(lambda: ckpt.restore(1, factory.abstract))
    ckpt.close()
    if args.dir is None:
        shutil.rmtree(base, ignore_errors=True)
    c, o, s = statistics.median(checksum), statistics.median(orbax_save), statistics.median(save)
    figures = {"config": args.config, "arrays": leaves, "values": values, "bytes": nbytes, "rounds": args.repeats,
               "cpus": os.cpu_count(), "load_average": os.getloadavg(),
               "checksum_s": {"median": c, "min": min(checksum), "cpu_median": statistics.median(cpu_checksum)},
               "checksum_with_nan_read_s": {"median": statistics.median(checksum_read), "min": min(checksum_read)},
               "orbax_save_s": {"median": o, "min": min(orbax_save), "cpu_median": statistics.median(cpu_orbax)},
               "mmjax_save_s": {"median": s, "min": min(save)}, "checksum_first_call_s": compile_and_first,
               "verified_restore_s": restore,
               "fraction_of_save": {"medians": c / o, "minimums": min(checksum) / min(orbax_save)},
               "all": {"checksum_s": checksum, "checksum_with_nan_read_s": checksum_read, "orbax_save_s": orbax_save,
                       "mmjax_save_s": save}}
    print(f"checksum_cost: {args.repeats} rounds, median (fastest): checksum {c:.2f} s ({min(checksum):.2f} s, "
          f"{nbytes / min(checksum) / 1e9:.1f} GB/s), Orbax save {o:.2f} s ({min(orbax_save):.2f} s); checksum = "
          f"{100 * c / o:.1f} % of a save ({100 * min(checksum) / min(orbax_save):.1f} % fastest against fastest); "
          f"CPU-seconds: checksum {statistics.median(cpu_checksum):.2f}, save {statistics.median(cpu_orbax):.2f}; "
          f"with the NaN/Inf read (a state the bound does not prove finite) {statistics.median(checksum_read):.2f} s; "
          f"first checksum with its compile {compile_and_first:.1f} s; mmjax save (both) {s:.2f} s; verified "
          f"restore {restore:.2f} s; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(figures, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
