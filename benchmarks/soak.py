"""Soak test: train while killing the process with SIGKILL at random moments, then check the result.

Trains CONFIG in a fresh workdir, SIGKILLs it `--kills` times (each at a random moment; about a
third of them the moment a checkpoint save is seen in progress), resuming with the same command each
time, until the run completes. Then trains the same config uninterrupted in a second workdir and
checks that the final parameters are bit-identical.

    python benchmarks/soak.py --config configs/demo.py --kills 10 \
        --override config.train.steps=300 --override config.checkpoint.every_steps=20

Prints one line per kill and a summary (kills during saves, incomplete checkpoints set aside,
restarts, wall time, and whether the params match). Exit code 0 iff they match.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, ROOT)
TMP_MARKER = ".orbax-checkpoint-tmp"


def _command(config: str, workdir: str, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "mmjax", "train", "--config", config, "--workdir", workdir,
            "--quiet", *[f"--{o}" for o in overrides]]


def _env() -> dict:
    """The runs use one CPU device, as a user's run does; other XLA_FLAGS are passed on."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count=")]
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, XLA_FLAGS=" ".join(flags))


def _saving(workdir: str) -> bool:
    ck = os.path.join(workdir, "checkpoints")
    return os.path.isdir(ck) and any(TMP_MARKER in n for n in os.listdir(ck))


def _completed_steps(workdir: str) -> int:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum(1 for line in f if '"loss"' in line)


def run_with_kills(config: str, workdir: str, overrides: list[str], kills: int, seed: int,
                   log=print) -> dict:
    """Runs training to completion while SIGKILLing it `kills` times. Returns counters."""
    rng = random.Random(seed)
    stats = {"kills": 0, "kills_during_save": 0, "restarts": 0}
    while True:
        proc = subprocess.Popen(_command(config, workdir, overrides), env=_env(), cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        stats["restarts"] += 1
        if stats["kills"] < kills:
            during_save = rng.random() < 0.34
            start_steps = _completed_steps(workdir)
            delay = rng.uniform(0.5, 4.0)
            t0 = time.time()
            killed = False
            while proc.poll() is None:
                progressed = _completed_steps(workdir) > start_steps
                if during_save and progressed and _saving(workdir):
                    kind = "during a save"
                    killed = True
                elif not during_save and progressed and time.time() - t0 > delay:
                    kind = f"{delay:.1f} s after steps resumed"
                    killed = True
                elif during_save and time.time() - t0 > 120:  # no save seen: kill anyway
                    kind, killed = "at a random moment (no save seen)", True
                if killed:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    stats["kills"] += 1
                    stats["kills_during_save"] += kind == "during a save"
                    log(f"soak: kill {stats['kills']}/{kills} {kind}, at ~step "
                        f"{_completed_steps(workdir)}")
                    break
                time.sleep(0.01)
            if killed:
                continue
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"training exited with {proc.returncode}:\n{err[-3000:]}")
        return stats


def final_params(workdir: str):
    import jax

    import mmjax

    return jax.device_get(mmjax.load(workdir).encoder.params)


def params_identical(a, b) -> bool:
    import jax
    import numpy as np

    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "demo.py"))
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--override", action="append", default=[],
                   help="config override without the leading dashes, e.g. config.train.steps=300")
    p.add_argument("--workdir", default=None, help="default: a temporary folder, removed afterwards")
    args = p.parse_args(argv)
    base = args.workdir or tempfile.mkdtemp(prefix="mmjax_soak_")
    killed_dir, straight_dir = os.path.join(base, "killed"), os.path.join(base, "straight")
    t0 = time.time()
    stats = run_with_kills(args.config, killed_dir, args.override, args.kills, args.seed)
    t_killed = time.time() - t0
    aside = os.path.join(killed_dir, "checkpoints.incomplete")
    stats["set_aside"] = len(os.listdir(aside)) if os.path.isdir(aside) else 0
    t0 = time.time()
    subprocess.run(_command(args.config, straight_dir, args.override), env=_env(), cwd=ROOT,
                   check=True, stdout=subprocess.DEVNULL)
    t_straight = time.time() - t0
    same = params_identical(final_params(killed_dir), final_params(straight_dir))
    print(f"soak: {stats['kills']} kills ({stats['kills_during_save']} during saves), "
          f"{stats['restarts']} starts, {stats['set_aside']} incomplete checkpoint(s) set aside; "
          f"killed run {t_killed:.0f} s, uninterrupted {t_straight:.0f} s; "
          f"final params bit-identical: {same}")
    if args.workdir is None:
        shutil.rmtree(base, ignore_errors=True)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
