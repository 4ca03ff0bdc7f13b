"""The cost of the train step's non-finite-state check (docs/reliability.md, "Non-finite state").

Compiles `config`'s train step three ways for the same synthetic batch on this host's first device:
  unchecked  skipped only on a non-finite loss or gradient norm (the step before the state check)
  dry run    + every update checked exactly: a dry run of the update reduced to one boolean, then the update
             (`make_train_step(..., bound_rule=None)`: what every step did before the carried bound)
  bound      the step as training runs it (`jit_train_step`): the carried bound proves the update finite, the
             dry run only when it cannot
each with its own state, warmed up by `--warmup` steps (the bound step's first one checks exactly and measures its
state), then alternates them for `--rounds` rounds of `--steps` steps each, the three taking turns at going first,
every step waited for. Wall and process CPU seconds per step; the machine may be shared, so the CPU seconds are the
steadier figure. Prints the medians and each check's cost against the unchecked step; `--out` writes them as JSON.

    python benchmarks/finite_check_cost.py --config configs/clip.py:B/32 --rounds 10 \\
        --override config.train.batch_size=8 --override config.model.dtype=float32
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from mmjax import config as config_lib  # noqa: E402
from mmjax.commands.bench import synthetic_batch  # noqa: E402
from mmjax.losses.gradcache import stop_frozen_gradients  # noqa: E402
from mmjax.runtime import sharding as shd  # noqa: E402
from mmjax.training.state import StateFactory, TrainState  # noqa: E402
from mmjax.training.step import make_train_step  # noqa: E402


def unchecked_step(factory, objective):
    """The step skipped only on a non-finite loss or gradient norm (as tests/test_finite_state.py's)."""
    tx, trainable = optax.with_extra_args_support(factory.tx), factory.trainable

    def step(state, batch):
        def loss_fn(params):
            return objective(factory.model, stop_frozen_gradients(params, trainable), batch, state.step)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(params, opt_state, grads):
            updates, opt_state = tx.update(grads, opt_state, params, grad_norm=grad_norm)
            return optax.apply_updates(params, updates), opt_state

        params, opt_state = jax.lax.cond(finite, update, lambda p, o, g: (p, o), state.params, state.opt_state, grads)
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm, skipped=(~finite).astype(jnp.int32))
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, bound=state.bound), metrics

    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/clip.py:B/32")
    p.add_argument("--override", action="append", default=[])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--steps", type=int, default=1, help="steps per variant and round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--variants", default="unchecked,dry run,bound")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    config = config_lib.load_config_file(args.config)
    config = config_lib.apply_overrides(config, ["config.mesh.data=1", "config.mesh.fsdp=1", "config.mesh.tensor=1"]
                                        + args.override)
    mesh = shd.make_mesh(config.mesh, jax.devices()[:1])
    factory = StateFactory(config, mesh)
    objective = factory.task.objective(config, mesh)
    with jax.set_mesh(mesh):
        batch = shd.global_batch(synthetic_batch(config, config.train.batch_size), mesh)
    builders = {
        "unchecked": lambda: unchecked_step(factory, objective),
        "dry run": lambda: make_train_step(factory.model, factory.tx, factory.schedule, objective,
                                           trainable=factory.trainable, bound_rule=None),
        "bound": lambda: make_train_step(factory.model, factory.tx, factory.schedule, objective,
                                         trainable=factory.trainable, bound_rule=factory.bound_rule),
    }
    names = [n.strip() for n in args.variants.split(",")]
    steps, states = {}, {}
    print(f"finite_check_cost: {args.config} {' '.join(args.override)}: {factory.param_count() / 1e6:.1f}M "
          f"parameters, bound rule {'on' if factory.bound_rule is not None else 'OFF'}", flush=True)
    with jax.set_mesh(mesh), nn.logical_axis_rules(factory.rules):
        for name in names:
            t0 = time.perf_counter()
            fn = jax.jit(builders[name](), in_shardings=(factory.shardings, shd.batch_sharding(mesh)),
                         out_shardings=(factory.shardings, shd.replicated(mesh)), donate_argnums=0)
            state = factory.init(config.seed)
            steps[name] = fn.lower(state, batch).compile()
            for _ in range(args.warmup):
                state, metrics = steps[name](state, batch)
            jax.block_until_ready(state)
            states[name] = state
            print(f"  {name}: compiled + {args.warmup} warm-up steps in {time.perf_counter() - t0:.1f} s; "
                  f"bound {jax.device_get(state.bound)}", flush=True)
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    skipped = {n: 0 for n in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            gc.collect()
            for _ in range(args.steps):
                t0, c0 = time.perf_counter(), time.process_time()
                states[name], metrics = steps[name](states[name], batch)
                jax.block_until_ready(metrics)
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
                skipped[name] += int(metrics["skipped"])
        print(f"  round {r + 1}: " + ", ".join(f"{n} {wall[n][-1]:.3f} s ({cpu[n][-1]:.3f} CPU-s)" for n in names),
              flush=True)
    figures = {"config": args.config, "overrides": args.override, "rounds": args.rounds, "steps": args.steps,
               "cpus": os.cpu_count(), "load_average": os.getloadavg(), "skipped": skipped,
               "bound": {n: [float(b) for b in jax.device_get(states[n].bound)] for n in names},
               "wall": wall, "cpu": cpu}
    med = {n: (statistics.median(wall[n]), statistics.median(cpu[n])) for n in names}
    line = ", ".join(f"{n} {w:.3f} s ({c:.3f} CPU-s)" for n, (w, c) in med.items())
    print(f"finite_check_cost: medians over {args.rounds} rounds x {args.steps} step(s): {line}")
    if "unchecked" in names:
        base_w, base_c = med["unchecked"]
        per_round = lambda series, name: [x - y for x, y in zip(series[name], series["unchecked"])]  # noqa: E731
        for name in names:
            if name == "unchecked":
                continue
            dw, dc = statistics.median(per_round(wall, name)), statistics.median(per_round(cpu, name))
            figures[f"{name}_cost"] = {"wall_s": dw, "cpu_s": dc, "wall_fraction": dw / base_w,
                                       "cpu_fraction": dc / base_c}
            print(f"  {name}: {dw * 1e3:+.0f} ms wall ({100 * dw / base_w:+.1f} %), {dc * 1e3:+.0f} ms CPU "
                  f"({100 * dc / base_c:+.1f} %) against the unchecked step (median of the paired differences)")
    print(f"  skipped steps: {skipped}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(figures, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
