"""Loader benchmark: decoded + augmented samples/s of the configured training pipeline, per worker and in total.

    python -m mmjax.data.synthetic --format webdataset --out /tmp/pairs --num 400 --per-shard 100
    python -m mmjax.data.bench --config configs/clip.py:B/16 --config.data.name=spec \
        --config.data.spec=/tmp/pairs/spec.json --config.train.batch_size=32 --steps 20 --workers 1 2
    python -m mmjax.data.bench --config configs/demo.py --config.train.batch_size=64

For each worker count W it builds the real training iterator (pipeline.make_train_loader, process 0 of 1,
config.data.num_workers = W; W = 0 runs in this process), reads `--warmup` batches (worker start-up,
first-use dataset preparation), then times `--steps` batches. Reported per W: wall seconds, samples/s in
total and per worker (total / max(W, 1)), and CPU seconds (this process + its worker processes, from
psutil) with CPU-seconds per 1,000 samples, the figure that does not depend on how loaded the machine is.
`--json PATH` also writes the rows.

`--paths prepared stream` times both paths on the same webdataset spec: the prepared path (data.name='spec':
array_record under data.data_dir, prepared on first use and not timed) and the streaming path
(data.name='wds_stream': the tar shards read in place). Each row then also gives samples/s per core: samples per
CPU second of the process and its workers, the figure that says how many cores a host needs per sample rate.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

import psutil

from mmjax import config as config_lib
from mmjax.data import pipeline


def _cpu_seconds(process: psutil.Process) -> float:
    """User + system CPU seconds of `process` and its live descendants."""
    total = 0.0
    for p in [process, *process.children(recursive=True)]:
        try:
            times = p.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def measure(config, workers: int, steps: int, warmup: int) -> dict[str, float]:
    """Times `steps` batches of the training iterator with `workers` worker processes."""
    config.unlock()
    config.data.num_workers = int(workers)
    config.lock()
    me = psutil.Process()
    iterator = pipeline.make_train_loader(config, 0, 1)
    try:
        for _ in range(warmup):
            next(iterator)
        cpu0, t0 = _cpu_seconds(me), time.perf_counter()
        for _ in range(steps):
            batch = next(iterator)
        wall, cpu = time.perf_counter() - t0, _cpu_seconds(me) - cpu0
    finally:
        iterator.close()
    samples = steps * int(config.train.batch_size)
    image = batch['image']
    return {'workers': workers, 'samples': samples, 'wall_s': wall, 'samples_per_s': samples / wall,
            'samples_per_s_per_worker': samples / wall / max(workers, 1), 'cpu_s': cpu,
            'cpu_s_per_1k_samples': 1000 * cpu / samples, 'samples_per_s_per_core': samples / max(cpu, 1e-9),
            'image_shape': list(image.shape[1:])}


PATHS = {'prepared': 'spec', 'stream': 'wds_stream'}  # --paths -> data.name


def with_data_name(config, name: str):
    """A copy of `config` reading the same spec through data.name=`name`."""
    config = config.copy_and_resolve_references()
    config.unlock()
    config.data.name = name
    config.lock()
    return config


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest, overrides = config_lib.split_overrides(argv)
    parser = argparse.ArgumentParser(prog='python -m mmjax.data.bench', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', required=True, help='a configs/*.py file (optionally file.py:arg)')
    parser.add_argument('--steps', type=int, default=20, help='timed batches per worker count')
    parser.add_argument('--warmup', type=int, default=2, help='untimed batches first')
    parser.add_argument('--workers', type=int, nargs='+', default=None,
                        help='worker counts to measure (default: config.data.num_workers)')
    parser.add_argument('--json', default='', help='also write the rows to this JSON file')
    parser.add_argument('--paths', nargs='+', choices=sorted(PATHS), default=None,
                        help="time these paths on the config's webdataset spec (default: the config's data.name)")
    args = parser.parse_args(rest)
    if args.steps <= 0 or args.warmup < 0:
        parser.error('--steps must be positive and --warmup >= 0')
    config = config_lib.apply_overrides(config_lib.load_config_file(args.config), overrides)
    workers = args.workers if args.workers is not None else [int(config.data.num_workers)]
    if any(w < 0 for w in workers):
        parser.error(f'--workers must be >= 0, got {workers}')
    print(f'mmjax.data.bench: data.name={config.data.name!r} batch {config.train.batch_size}, '
          f'{args.steps} timed batches after {args.warmup} warm-up, {psutil.cpu_count()} CPUs', flush=True)
    if args.paths and config.data.name not in PATHS.values():
        parser.error(f"--paths needs a webdataset spec: data.name='spec' or 'wds_stream', not {config.data.name!r}")
    rows = []
    for path in args.paths or [None]:
        cfg = with_data_name(config, PATHS[path]) if path else config
        for w in workers:
            row = {'path': path or cfg.data.name, **measure(cfg, w, args.steps, args.warmup)}
            rows.append(row)
            print(f"{row['path']} workers={w}: {row['samples_per_s']:.1f} samples/s total, "
                  f"{row['samples_per_s_per_worker']:.1f} per worker, {row['samples_per_s_per_core']:.1f} per core; "
                  f"{row['wall_s']:.2f} s wall, {row['cpu_s']:.2f} CPU s ({row['cpu_s_per_1k_samples']:.2f} CPU s / "
                  f"1k samples); images {row['image_shape']}", flush=True)
    if args.json:
        with open(args.json, 'w') as handle:
            json.dump(rows, handle, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
