"""data.name='wds_stream': webdataset / img2dataset tar shards streamed in place, without a preparation pass.

    shards (wds.stream_spec: sorted; a shard's id is its position) -> per epoch e a permutation of all shards,
    seeded by (config.seed, e), the same on every process -> process p of n takes order[p::n], grain worker w of
    W takes that [w::W] -> `data.open_shards` of them read round-robin, each front to back -> a shuffle buffer of
    `data.shuffle_buffer` raw samples (one uniformly drawn out per sample, by the reader's own seeded RNG) ->
    decode + check + crop + tokenize (DecodeCropTokenize; its RNG keyed by (seed, epoch, shard, index in shard))
    -> bad samples skipped and counted -> host batches of B / n -> W grain worker processes (W = 0: one thread).

Each reader (one per grain worker) has its own epochs: when its shards of epoch e are done it opens those of
e + 1. Its state - epoch, position in its shard order, the open shards and the samples read from each, the
shuffle buffer as (epoch, shard, index) references, the buffer RNG's state, its counts of bad samples and failed
shards - is a small JSON-able dict; grain's batch / prefetch / multiprocess iterators carry it, and
`StreamIterator.get_state` is what every checkpoint saves (mmjax/training/checkpoint.py DataIteratorHandler). A
restored reader re-reads the buffered samples from their shards (one front-to-back pass of each shard the
buffer references) and skips each open shard to its offset, so a resume on the same process and worker counts
yields exactly the batches an uninterrupted run would. On other counts the saved progress (whole shards of the
slowest reader) is kept and the rest is approximate, with a warning.

Shards and the spec may be local paths or gs:// / s3:// URLs: every read goes through mmjax/data/wds.py and
`mmjax.storage`, and a bucket that cannot be reached is a StorageError when the config is checked, before anything
compiles. Unlike the prepared path, batches depend on the process count (each process reads its own shards); a
sample that is bad is skipped where it is read (every epoch), and a shard that cannot be opened or breaks off (it
was deleted after the run started, it is truncated, its bucket stopped answering) is reported and skipped for the
rest of the run by each reader that meets it (shards move between readers from epoch to epoch, so
`data/bad_shards` counts a shard once per reader that found it failed). More than
`limits.max_bad_fraction` of a reader's shards per epoch failed, or of its samples bad (after
`limits.min_samples_for_fraction` samples), stops the run with BadDataError.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import grain.python as grain
import numpy as np
from absl import flags

from mmjax.data import wds
from mmjax.data.decode import (
    BAD_KINDS,
    BadDataError,
    BadSample,
    DataSpecError,
    DecodeStats,
    clean_caption,
    decode_image,
)
from mmjax.data.iterators import InnerIteratorOwner

KIND = 'wds_stream'
MARK = 'wds_stream_reader'  # key that marks a reader's state inside grain's nested iterator states


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the readers of one process need (picklable: it travels to grain's worker processes)."""

    spec: wds.StreamSpec
    transform: Any  # decode.DecodeCropTokenize: encoded record -> model-ready example
    process_index: int
    process_count: int
    shuffle_seed: int
    map_seed: int
    buffer_size: int
    open_shards: int
    start: tuple[int, float] = (0, 0.0)  # (epoch, fraction of its shards done) of a fresh reader

    def assigned(self, epoch: int, worker: int, workers: int) -> list[int]:
        """Shard ids the reader `worker` of `workers` of this process streams in `epoch`, in order."""
        order = np.random.default_rng([self.shuffle_seed, epoch]).permutation(len(self.spec.shards))
        return [int(s) for s in order[self.process_index::self.process_count][worker::workers]]


class _Reader:
    """One open shard: its samples from `offset` on (the first `offset` are skipped at the first read)."""

    def __init__(self, epoch: int, shard: int, path: str, offset: int = 0):
        self.epoch, self.shard, self.path, self.offset = epoch, shard, path, offset
        self._skip = offset
        self._samples = wds.iter_shard(path)

    def read(self) -> tuple:
        """(epoch, shard, index, key, image | BadSample, captions); StopIteration at the end."""
        while self._skip:
            next(self._samples)
            self._skip -= 1
        key, image, captions = next(self._samples)
        self.offset += 1
        return self.epoch, self.shard, self.offset - 1, key, image, captions

    def close(self) -> None:
        self._samples.close()


def _warn(message: str) -> None:
    print(f'mmjax: wds_stream: {message}', file=sys.stderr, flush=True)


class ShardStream(grain.DatasetIterator):
    """One reader's endless stream of model-ready examples (see the module docstring)."""

    def __init__(self, plan: Plan, worker: int = 0, workers: int = 1):
        super().__init__()
        self._plan, self._worker, self._workers = plan, worker, workers
        self._limits = plan.spec.limits
        self._pending: dict[str, Any] | None = {
            MARK: 1, 'epoch': plan.start[0], 'cursor': None, 'fraction': plan.start[1], 'turn': 0, 'open': [],
            'buffer': [], 'rng': None, 'stats': DecodeStats().to_dict(), 'failed': [], 'emitted': 0}
        self._readers: list[_Reader] = []
        self._buffer: list[tuple] = []
        self._orders: dict[int, list[int]] = {}

    # ------------------------------------------------------------------------------------------------ state
    def get_state(self) -> dict[str, Any]:
        if self._pending is not None:
            return dict(self._pending)
        return {MARK: 1, 'epoch': self._epoch, 'cursor': self._cursor, 'fraction': 0.0, 'turn': self._turn,
                'open': [[r.epoch, r.shard, r.offset] for r in self._readers],
                'buffer': [v for sample in self._buffer for v in sample[:3]],
                'rng': self._rng.bit_generator.state, 'stats': self._stats.to_dict(), 'failed': sorted(self._failed),
                'emitted': self._emitted, 'per_epoch': len(self._order(self._epoch))}

    def set_state(self, state: dict[str, Any]) -> None:
        if MARK not in state:
            raise ValueError(f'not a wds_stream reader state: {sorted(state)}')
        self._close_readers()
        self._buffer = []
        self._pending = dict(state)

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            if len(self._orders) > 4:
                self._orders.clear()
            self._orders[epoch] = self._plan.assigned(epoch, self._worker, self._workers)
        return self._orders[epoch]

    def _revive(self) -> None:
        """Applies the pending state: counters, RNG, open shards, and the shuffle buffer re-read from its shards."""
        state, plan = self._pending, self._plan
        if not self._order(0):
            raise DataSpecError(f'data.spec: {len(plan.spec.shards)} shards cannot feed {plan.process_count} '
                                f'process(es) x {self._workers} reader(s) each; give at least that many shards or '
                                f'set fewer data.num_workers')
        self._epoch, self._turn, self._emitted = int(state['epoch']), int(state['turn']), int(state['emitted'])
        cursor = state['cursor']
        self._cursor = int(cursor) if cursor is not None else int(state['fraction'] * len(self._order(self._epoch)))
        self._stats = DecodeStats.from_dict(state['stats'])
        self._failed = {int(s) for s in state['failed']}
        self._rng = np.random.default_rng([plan.shuffle_seed, plan.process_index, self._worker, 1])
        if state['rng'] is not None:
            self._rng.bit_generator.state = state['rng']
        shards = plan.spec.shards
        self._readers = [_Reader(e, s, shards[s], offset) for e, s, offset in state['open']]
        refs = [tuple(int(v) for v in state['buffer'][i:i + 3]) for i in range(0, len(state['buffer']), 3)]
        found = self._reread(refs)
        self._buffer = [ref + found[ref[1:]] for ref in refs if ref[1:] in found]
        self._pending = None

    def _reread(self, refs: list[tuple[int, int, int]]) -> dict[tuple[int, int], tuple]:
        """{(shard, index): (key, image, captions)} of the buffered samples, each shard read once up to its last."""
        wanted: dict[int, set[int]] = {}
        for _, shard, index in refs:
            wanted.setdefault(shard, set()).add(index)
        found = {}
        for shard, indices in sorted(wanted.items()):
            try:
                for index, sample in enumerate(wds.iter_shard(self._plan.spec.shards[shard])):
                    if index in indices:
                        found[shard, index] = sample
                    if index >= max(indices):
                        break
            except wds.SHARD_ERRORS as error:
                self._shard_failed(shard, error)
        lost = sum(1 for ref in refs if ref[1:] not in found)
        if lost:
            _warn(f'{lost} buffered sample(s) could not be read again; resumed without them')
        return found

    # ------------------------------------------------------------------------------------------------ reading
    def _open_next(self) -> _Reader:
        """The next shard of this reader's order (into the next epoch at the end), skipping failed ones."""
        while True:
            order = self._order(self._epoch)
            if self._failed.issuperset(order):
                raise BadDataError(f'wds_stream: every shard of this reader failed ({len(order)}): '
                                   f'{[self._plan.spec.shards[s] for s in order[:3]]} ...')
            if self._cursor >= len(order):
                self._epoch, self._cursor = self._epoch + 1, 0
                continue
            shard = order[self._cursor]
            self._cursor += 1
            if shard not in self._failed:
                return _Reader(self._epoch, shard, self._plan.spec.shards[shard])

    def _shard_failed(self, shard: int, error: BaseException) -> None:
        self._failed.add(shard)
        per_epoch = len(self._order(self._epoch))
        where = self._plan.spec.shards[shard]
        _warn(f'shard {where} failed and is skipped by this reader for the rest of the run ({type(error).__name__}: '
              f'{error}); {len(self._failed)} of its {per_epoch} shards per epoch failed')
        limit = self._limits.max_bad_fraction
        if len(self._failed) > limit * per_epoch:
            raise BadDataError(f'wds_stream: {len(self._failed)} of the {per_epoch} shards of a reader failed (> '
                               f'limits.max_bad_fraction={limit:.0%}), the last {where}: {type(error).__name__}: '
                               f'{error}')

    def _fill(self) -> None:
        """Reads round-robin from the open shards until the buffer holds `buffer_size` samples."""
        empty_opens = 0
        while len(self._buffer) < self._plan.buffer_size:
            while len(self._readers) < self._plan.open_shards:
                self._readers.append(self._open_next())
            self._turn %= len(self._readers)
            reader = self._readers[self._turn]
            try:
                self._buffer.append(reader.read())
                self._turn += 1
                empty_opens = 0
                continue
            except StopIteration:
                empty_opens += 1
            except wds.SHARD_ERRORS as error:
                self._shard_failed(reader.shard, error)
            reader.close()
            self._readers[self._turn] = self._open_next()  # the next shard takes the finished one's turn
            if empty_opens > 2 * len(self._plan.spec.shards) + self._plan.open_shards:
                raise BadDataError(f'wds_stream: the shards of this reader hold no samples '
                                   f'({self._plan.spec.shards[reader.shard]} ...)')

    def _example(self, sample: tuple) -> dict[str, np.ndarray]:
        """A buffered sample -> model-ready example; raises BadSample (kinds checked as at prepare time)."""
        epoch, shard, index, key, image, captions = sample
        if isinstance(image, BadSample):
            raise image
        clean, first_error = [], None
        for caption in captions:
            try:
                clean.append(clean_caption(caption, self._limits))
            except BadSample as error:
                first_error = first_error or error
        if not clean:
            decode_image(image, self._limits)  # a bad image is reported as such first, as at prepare time
            raise first_error or BadSample('empty_caption', f'{key!r}: no caption')
        rng = np.random.default_rng([self._plan.map_seed, epoch, shard, index])
        return self._plan.transform.random_map({'image': image, 'captions': clean, 'key': key}, rng)

    def __next__(self) -> dict[str, np.ndarray]:
        if self._pending is not None:
            self._revive()
        while True:
            self._fill()
            pick = int(self._rng.integers(len(self._buffer)))
            self._buffer[pick], self._buffer[-1] = self._buffer[-1], self._buffer[pick]
            sample = self._buffer.pop()
            try:
                example = self._example(sample)
            except BadSample as bad:
                self._stats.bad(bad.kind)
                self._check_fraction()
                continue
            self._stats.ok()
            self._emitted += 1
            return example

    def _check_fraction(self) -> None:
        stats, limits = self._stats, self._limits
        if stats.seen >= limits.min_samples_for_fraction and stats.bad_fraction > limits.max_bad_fraction:
            raise BadDataError(f'wds_stream: {stats.num_bad} of {stats.seen} samples read were bad (> '
                               f'limits.max_bad_fraction={limits.max_bad_fraction:.0%}): {stats.summary()}')

    def _close_readers(self) -> None:
        for reader in self._readers:
            reader.close()
        self._readers = []

    def close(self) -> None:
        self._close_readers()
        super().close()


class ShardStreamDataset(grain.IterDataset):
    """IterDataset of one process's readers; grain's multiprocess prefetch slices it per worker (`set_slice`)."""

    def __init__(self, plan: Plan):
        super().__init__()
        self._plan = plan
        self._worker, self._workers = 0, 1

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        self._worker, self._workers = sl.start or 0, sl.step or 1

    def __iter__(self) -> ShardStream:
        return ShardStream(self._plan, self._worker, self._workers)

    def __str__(self) -> str:
        return f'ShardStreamDataset({len(self._plan.spec.shards)} shards, reader {self._worker}/{self._workers})'


def reader_states(state: Any) -> list[dict[str, Any]]:
    """The reader states inside grain's nested iterator state (batch, prefetch, interleave of workers)."""
    if isinstance(state, dict):
        if MARK in state:
            return [state]
        return [r for value in state.values() for r in reader_states(value)]
    if isinstance(state, (list, tuple)):
        return [r for value in state for r in reader_states(value)]
    return []


def progress(readers: list[dict[str, Any]]) -> float:
    """Epochs done by the slowest reader, counting its whole shards finished (0.0 with no reader yet)."""
    done = []
    for r in readers:
        if r.get('cursor') is None:
            done.append(r['epoch'] + r['fraction'])
        else:
            done.append(r['epoch'] + max(r['cursor'] - len(r['open']), 0) / max(r.get('per_epoch', 1), 1))
    return min(done, default=0.0)


def summed_stats(readers: list[dict[str, Any]]) -> tuple[DecodeStats, int]:
    """(decode stats of all readers together, failed shards of all readers)."""
    stats = DecodeStats()
    for r in readers:
        stats.update(DecodeStats.from_dict(r['stats']))
    return stats, sum(len(r['failed']) for r in readers)


class StreamIterator(InnerIteratorOwner):
    """Endless iterator of one process's host batches of a `wds_stream` corpus, resumable on the same process and
    worker counts (approximately on others; see the module docstring).

    State: {'kind': 'wds_stream', 'process_index', 'process_count', 'num_workers', 'batches' (host batches
    returned), 'carried' (decode stats carried over from an approximate resume), 'inner': grain's iterator state,
    holding each reader's state}. `set_state` takes effect at the next `next` / `start_prefetch`.
    """

    def __init__(self, plan: Plan, host_batch: int, num_workers: int):
        super().__init__()
        self._inner: grain.DatasetIterator | None = None
        self._plan, self._host_batch, self._num_workers = plan, int(host_batch), int(num_workers)
        readers = plan.process_count * max(self._num_workers, 1)
        if len(plan.spec.shards) < readers:
            raise DataSpecError(f'data.spec: {len(plan.spec.shards)} shard(s) cannot feed {plan.process_count} '
                                f'process(es) x {max(self._num_workers, 1)} reader(s); give at least {readers} '
                                f'shards or set fewer data.num_workers')
        self._inner_state: Any = None
        self._carried = DecodeStats()
        self._batches = 0

    def _start(self) -> grain.DatasetIterator:
        if self._inner is None:
            batches = ShardStreamDataset(self._plan).batch(self._host_batch, drop_remainder=True)
            if self._num_workers > 0:
                mark_absl_flags_parsed()
                batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._num_workers))
            else:  # decode in a background thread while the step runs
                batches = grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=2)
            inner = iter(batches)
            if self._inner_state is not None:
                inner.set_state(self._inner_state)
            self._inner = inner
        return self._inner

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        batch = next(self._start())
        self._batches += 1
        return batch

    def _readers(self) -> list[dict[str, Any]]:
        return reader_states(self._inner.get_state() if self._inner is not None else self._inner_state)

    def stats(self) -> dict[str, float]:
        """This process's data metrics: 'data/bad_samples', 'data/bad_fraction', 'data/bad/<kind>' (samples
        skipped at read time, every epoch they are met), 'data/bad_shards' (shards failed and skipped),
        'data/epoch' (epochs done by this process's slowest reader, counting whole shards)."""
        readers = self._readers()
        bad, failed = summed_stats(readers)
        bad.update(self._carried)
        out = {'data/bad_samples': float(bad.num_bad), 'data/bad_fraction': float(bad.bad_fraction),
               'data/bad_shards': float(failed), 'data/epoch': float(progress(readers))}
        out.update({f'data/bad/{kind}': float(bad.skipped.get(kind, 0)) for kind in BAD_KINDS})
        return out

    def get_state(self) -> dict[str, Any]:
        plan = self._plan
        return {'kind': KIND, 'process_index': plan.process_index, 'process_count': plan.process_count,
                'num_workers': self._num_workers, 'batches': self._batches, 'carried': self._carried.to_dict(),
                'inner': self._inner.get_state() if self._inner is not None else self._inner_state}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get('kind') != KIND:
            raise ValueError(f"the saved data-iterator state is not a wds_stream one ({sorted(state)}): the "
                             f"checkpoint was written with another data.name")
        self._stop_inner()
        self._batches = int(state['batches'])
        self._carried = DecodeStats.from_dict(state['carried'])
        plan, same = self._plan, (state['process_count'], state['num_workers'], state['process_index']) == (
            self._plan.process_count, self._num_workers, self._plan.process_index)
        if same:
            self._inner_state = state['inner']
            return
        readers = reader_states(state['inner'])
        done = progress(readers)
        self._carried.update(summed_stats(readers)[0])
        _warn(f"the checkpoint's stream was read by process {state['process_index']} of {state['process_count']} "
              f"with {state['num_workers']} worker(s), this is process {plan.process_index} of "
              f"{plan.process_count} with {self._num_workers}: resuming approximately, at {done:.3f} epochs "
              f"(whole shards); the shuffle buffer starts empty")
        self._plan = dataclasses.replace(plan, start=(int(done), done - int(done)))
        self._inner_state = None


    def __str__(self) -> str:
        plan = self._plan
        return (f'StreamIterator(process {plan.process_index}/{plan.process_count}, {len(plan.spec.shards)} '
                f'shards, host batch {self._host_batch}, batches={self._batches})')


def config_problems(data) -> list[str]:
    """Problems of `config.data` (its section) for data.name='wds_stream': the spec, its shards, the stream keys."""
    problems = []
    for key in ('shuffle_buffer', 'open_shards'):
        if int(data[key]) < 1:
            problems.append(f'data.{key} must be >= 1, got {data[key]}')
    try:
        wds.stream_spec(data.spec, data.get('train_split', 'train') or 'train')
    except DataSpecError as error:
        problems.append(str(error))
    return problems


def mark_absl_flags_parsed() -> None:
    """grain 0.2.18 reads an absl flag when starting workers (google/grain#1355); see pipeline.py."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


__all__ = ['KIND', 'Plan', 'ShardStream', 'ShardStreamDataset', 'StreamIterator', 'progress', 'reader_states',
           'summed_stats']
