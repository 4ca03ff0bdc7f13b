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
`--json PATH` also writes the rows (with `--stages`, a first row {'path': 'stages', 'cpu_ms_per_sample': ...}).

`--paths prepared stream` times both paths on the same webdataset spec: the prepared path (data.name='spec':
array_record under data.data_dir, prepared on first use and not timed) and the streaming path
(data.name='wds_stream': the tar shards read in place). Each row then also gives samples/s per core: samples per
CPU second of the process and its workers, the figure that says how many cores a host needs per sample rate.

`--stages N` (prepared captioned data: data.name 'spec', 'tfds' or 'mixture') first times each stage of one
sample's path in this process, over the first N stream positions, with time.process_time around each stage:
read (the batched array_record read of a batch's records, per sample), decode (header, caption and crop-box
draws, JPEG decode at the crop's DCT scale), crop_resize (one bicubic resize, flip, gray), normalise (float32
mean / std), tokenise, batch (stacking a batch's examples as grain does, per sample). It prints them as a table of
CPU-ms per sample; the pipeline rows that follow are the overall figure (their CPU s / 1k samples = CPU-ms per
sample), and their excess over the stages' sum is grain's own work (per-element RNGs, iterator, prefetch thread):

    python -m mmjax.data.bench --config configs/clip.py:B/16 --config.data.name=spec \
        --config.data.spec=/tmp/pairs/spec.json --steps 20 --workers 0 --stages 800
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

import numpy as np
import psutil

from mmjax import config as config_lib
from mmjax import storage
from mmjax.data import pipeline, sources
from mmjax.data.decode import STAGES

ALL_STAGES = ('read', *STAGES, 'batch')


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


def stage_times(config, samples: int) -> dict[str, float]:
    """CPU-ms per sample of each of ALL_STAGES over the first `samples` positions of the training stream,
    timed in this process (time.process_time between stages; the per-element RNG's creation is left out).
    Needs prepared captioned data (data.name 'spec', 'tfds' or 'mixture'); raises ValueError otherwise."""
    if not pipeline.is_captioned(config) or config.data.name == PATHS['stream']:
        raise ValueError(f"--stages times prepared captioned data (data.name 'spec', 'tfds' or 'mixture'), not "
                         f"data.name={config.data.name!r}")
    split = config.data.get('train_split', 'train') or 'train'
    opened = [sources.open_member(m, config, split, progress=False) for m in sources.members(config)]
    records = pipeline.captioned_records(config, opened)
    transform = pipeline.decode_transform(config)
    _, map_seed = pipeline.stream_seeds(config.seed)
    batch_size = int(config.train.batch_size)
    totals = dict.fromkeys(ALL_STAGES, 0.0)
    clock = [0.0]

    def lap(stage: str) -> None:
        now = time.process_time()
        totals[stage] += now - clock[0]
        clock[0] = now

    for start in range(0, samples, batch_size):
        positions = list(range(start, min(samples, start + batch_size)))
        clock[0] = time.process_time()
        elements = records._getitems(positions)  # grain's batched read, as its batch() reads a batch's records
        lap('read')
        examples = []
        for element, position in zip(elements, positions):
            rng = np.random.default_rng([map_seed, position])
            clock[0] = time.process_time()
            examples.append(transform.staged_map(element, rng, lap))
        clock[0] = time.process_time()
        _stack(examples)
        lap('batch')
    return {stage: 1000 * seconds / samples for stage, seconds in totals.items()}


def _stack(examples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """A batch as grain's batch() makes it: each key's values stacked on a new leading axis [b, ...]."""
    return {key: np.stack([example[key] for example in examples]) for key in examples[0]}


def format_stages(times: dict[str, float], samples: int) -> str:
    """The table `--stages` prints: CPU-ms per sample per stage and their sum."""
    lines = [f'per-stage CPU time, in this process, over {samples} samples:', '  stage         CPU-ms / sample']
    lines += [f'  {stage:<13} {ms:8.3f}' for stage, ms in times.items()]
    lines.append(f"  {'sum':<13} {sum(times.values()):8.3f}")
    return '\n'.join(lines)


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
    parser.add_argument('--stages', type=int, default=0, metavar='N',
                        help='first time each stage of one sample in this process over N samples (CPU-ms / sample)')
    args = parser.parse_args(rest)
    if args.steps <= 0 or args.warmup < 0 or args.stages < 0:
        parser.error('--steps must be positive, --warmup and --stages >= 0')
    config = config_lib.apply_overrides(config_lib.load_config_file(args.config), overrides)
    workers = args.workers if args.workers is not None else [int(config.data.num_workers)]
    if any(w < 0 for w in workers):
        parser.error(f'--workers must be >= 0, got {workers}')
    print(f'mmjax.data.bench: data.name={config.data.name!r} batch {config.train.batch_size}, '
          f'{args.steps} timed batches after {args.warmup} warm-up, {psutil.cpu_count()} CPUs', flush=True)
    if args.paths and config.data.name not in PATHS.values():
        parser.error(f"--paths needs a webdataset spec: data.name='spec' or 'wds_stream', not {config.data.name!r}")
    rows = []
    if args.stages:
        try:
            times = stage_times(config, args.stages)
        except ValueError as error:
            parser.error(str(error))
        rows.append({'path': 'stages', 'samples': args.stages, 'cpu_ms_per_sample': times})
        print(format_stages(times, args.stages), flush=True)
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
        storage.write_text_atomic(args.json, json.dumps(rows, indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
