"""Preparing a builder spec on Apache Beam (TFDS's own Beam support): the same records as one process writes.

    prep = BeamPreparation('DirectRunner', pipeline_flags('DirectRunner', num_workers=2))
    builders.prepare_dataset(spec, data_dir, beam=prep)          # what `mmjax prepare --runner ...` runs

TFDS's GeneratorBasedBuilder accepts a Beam PTransform as a split's generator and then runs the pipeline on
`tfds.download.DownloadConfig(beam_runner, beam_options)`; its BeamWriter writes the array_record shards. The
transform of one split (`split_transform`), for the files of the split numbered in spec order:

    Create(numbered files) | Reshuffle | FlatMap(_decode_file)   one file per call: `builders.file_examples`, the
        -> (file number, position among the file's kept records, record)   single-process per-file loop (full
        -> tagged 'stats': (file number, DecodeStats dict)                 decode, bad samples counted, the file's
                                                                            bad fraction checked: BadDataError)
    stats | ToList -> offsets: the kept records of the files before each file          (a side input)
    records | Map(_with_index, offsets) -> (index, record + 'index')   index = offset[file] + position
    stats | ToList | Map(_write_stats) -> one JSON file per split under data_dir, read back by the launching process

The single-process builder numbers records the same way (files in order, then kept samples in order), TFDS's
shuffle is off in both and the TFDS key is the index, so both write the same records in the same order and the
same counts into decode_stats.json. The functions Beam runs are module-level (the multi-processing DirectRunner and
Dataflow serialise them by reference, so workers need mmjax installed). apache-beam is optional: it is imported on
first use through TFDS's lazy import (`tfds.core.lazy_imports.apache_beam`), never by `import mmjax`.

A BadDataError (or StorageError) raised in a worker reaches the launching process inside the runner's own error
(the multi-processing DirectRunner and Dataflow give the worker's traceback as text); `prepare` raises it again as
itself, one line naming the file.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import re
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import tensorflow_datasets as tfds

from mmjax import storage
from mmjax.data import builders
from mmjax.data.decode import BadDataError, DataSpecError, DecodeStats
from mmjax.errors import MmjaxError, StorageError

RUNNERS = ('DirectRunner', 'DataflowRunner')
STATS_TAG = 'stats'
# Errors a worker raises on purpose, raised again by name in the launching process (`_worker_error`).
WORKER_ERRORS = (BadDataError, StorageError, DataSpecError)


class BeamSetupError(MmjaxError):
    """apache-beam is missing, or a runner's settings cannot work (the message says what to install or pass)."""


def _beam():
    """The apache_beam module, imported on first use (TFDS's documented lazy import)."""
    try:
        return tfds.core.lazy_imports.apache_beam
    except ImportError as error:
        raise BeamSetupError('preparing on Apache Beam needs apache-beam: pip install "apache-beam>=2.77" (for '
                             'Dataflow: pip install "apache-beam[gcp]")') from error


def pipeline_flags(runner: str, num_workers: int | None = None, project: str | None = None,
                   region: str | None = None, temp_location: str | None = None, machine_type: str | None = None,
                   max_num_workers: int | None = None, setup_file: str | None = None,
                   extra: Sequence[str] = ()) -> list[str]:
    """Beam pipeline flags for `runner`: the DirectRunner runs `num_workers` local worker processes
    (multi_processing mode; in the launching process for one), Dataflow gets its usual options; `extra` are further
    Beam flags as given (e.g. '--sdk_container_image=...'). Raises BeamSetupError for settings that cannot work."""
    if runner not in RUNNERS:
        raise BeamSetupError(f'--runner {runner!r}: choose one of {RUNNERS} (or none, to prepare in this process)')
    if num_workers is not None and num_workers < 1:
        raise BeamSetupError(f'--num-workers {num_workers}: give at least 1')
    flags = [f'--runner={runner}']
    if runner == 'DirectRunner':
        workers = num_workers or 1
        mode = 'multi_processing' if workers > 1 else 'in_memory'
        # The worker processes log every step, and a failing sample's traceback several times over; `prepare`
        # reports the error itself (`--beam-option=--default_sdk_harness_log_level=INFO` shows the logs again).
        flags += [f'--direct_num_workers={workers}', f'--direct_running_mode={mode}',
                  '--default_sdk_harness_log_level=CRITICAL']
        return flags + list(extra)
    missing = [name for name, value in (('--project', project), ('--region', region),
                                        ('--temp-location', temp_location)) if not value]
    if missing:
        raise BeamSetupError(f'--runner DataflowRunner needs {", ".join(missing)}')
    if storage.scheme(temp_location) != 'gs':
        raise BeamSetupError(f'--temp-location {temp_location}: Dataflow needs a gs:// folder')
    flags += [f'--project={project}', f'--region={region}', f'--temp_location={temp_location}']
    for flag, value in (('num_workers', num_workers), ('max_num_workers', max_num_workers),
                        ('machine_type', machine_type), ('setup_file', setup_file)):
        if value:
            flags.append(f'--{flag}={value}')
    return flags + list(extra)


class BeamPreparation:
    """How `builders.prepare_dataset(..., beam=...)` prepares on Beam: the runner, its pipeline flags, and the
    per-split transforms (`split_transform`) that TFDS runs."""

    def __init__(self, runner: str, flags: Sequence[str] = ()):
        self.runner = runner
        self.flags = list(flags)
        self.stats_dir: str | None = None  # set by `prepare`: where the workers write each split's counts

    def check_paths(self, spec: Mapping[str, Any], data_dir: str) -> None:
        """Dataflow's workers cannot see this machine's disk: refuses local data files or data_dir for it (`spec`
        normalised)."""
        if self.runner != 'DataflowRunner':
            return
        local = [p for files in spec['splits'].values() for p in files if not storage.is_url(p)]
        local += [data_dir] if storage.scheme(data_dir) != 'gs' else []
        if local or (spec.get('image_root') and not storage.is_url(spec['image_root'])):
            raise BeamSetupError(f'--runner DataflowRunner reads and writes from its own machines: the spec\'s files '
                                 f'and --data-dir must be gs:// URLs (local: {(local or [spec["image_root"]])[0]})')

    def download_config(self) -> tfds.download.DownloadConfig:
        beam = _beam()
        options = beam.options.pipeline_options.PipelineOptions(self.flags)
        return tfds.download.DownloadConfig(beam_runner=self.runner, beam_options=options)

    def split_transform(self, spec: Mapping[str, Any], split: str, files: Sequence[str]):
        """The Beam PTransform of one split: (index, record) for the kept samples of `files` (see the module
        docstring); TFDS applies it to its pipeline and writes what it yields."""
        beam = _beam()
        settings = {k: v for k, v in spec.items() if k != 'splits'}  # what each worker needs, without every file
        return beam.ptransform_fn(_split_pipeline)(spec=settings, files=list(files),
                                                    stats_path=storage.join(self.stats_dir, f'{split}.json'))

    def prepare(self, builder, data_dir: str) -> dict[str, DecodeStats]:
        """Runs TFDS's download_and_prepare of `builder` (a `builders` builder made with beam=self) on the runner;
        returns the decode stats per split. An mmjax error raised in a worker is raised again as itself (one line;
        the DirectRunner's own log of the worker's traceback is held back)."""
        self.check_paths(builder.SPEC, data_dir)
        self.stats_dir = storage.join(data_dir, f'.{builder.name}.beam-stats-{uuid.uuid4().hex[:12]}')
        storage.makedirs(self.stats_dir)
        try:
            with _quiet_local_runner(self.runner == 'DirectRunner'):
                builder.download_and_prepare(download_config=self.download_config())
            return {split: DecodeStats.from_dict(json.loads(storage.read_text(storage.join(self.stats_dir,
                                                                                           f'{split}.json'))))
                    for split in builder.SPEC['splits']}
        except WORKER_ERRORS as error:  # the in-process runner raises it with Beam's note appended
            raise type(error)(_first_line(str(error))) from error
        except MmjaxError:
            raise
        except Exception as error:  # the runner's own error holding a worker's traceback
            found = _worker_error(error)
            if found is None:
                raise
            raise found from error
        finally:
            storage.rmtree(self.stats_dir)


@contextlib.contextmanager
def _quiet_local_runner(quiet: bool) -> Iterator[None]:
    """Holds back the local runner's log records (a failing worker's traceback, logged before the runner raises
    the error that `prepare` reports) while `quiet`."""
    logger = logging.getLogger('apache_beam')
    level = logger.level
    if quiet:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _first_line(text: str) -> str:
    """A worker error's message without what Beam appends (`[while running '...']`, further lines)."""
    return re.sub(r"\s*\[while running '.*$", '', text.strip().splitlines()[0] if text.strip() else text)


def _worker_error(error: Exception) -> Exception | None:
    """The mmjax error a worker raised, found by name in the runner's error text, or None."""
    text = str(error)
    for cls in WORKER_ERRORS:
        found = re.search(rf'\b{cls.__name__}: (.+)', text)
        if found:
            return cls(_first_line(found.group(1)))
    return None


# ----------------------------------------------------------------------------- what the workers run (module-level)

def _split_pipeline(pipeline, spec: dict[str, Any], files: list[str], stats_path: str):
    beam = _beam()
    decoded = (pipeline
               | 'Files' >> beam.Create(list(enumerate(files)))
               | 'SpreadFiles' >> beam.Reshuffle()
               | 'Decode' >> beam.FlatMap(_decode_file, spec=spec).with_outputs(STATS_TAG, main='records'))
    per_file = decoded[STATS_TAG] | 'CollectStats' >> beam.combiners.ToList()
    _ = per_file | 'WriteStats' >> beam.Map(_write_stats, path=stats_path)
    offsets = per_file | 'Offsets' >> beam.Map(_offsets, num_files=len(files))
    return decoded.records | 'Index' >> beam.Map(_with_index, offsets=beam.pvalue.AsSingleton(offsets))


def _decode_file(numbered: tuple[int, str], spec: dict[str, Any]):
    """(file number, position, record) per kept sample of one file, then its counts as the tagged 'stats' output."""
    file_number, path = numbered
    stats = DecodeStats()
    for position, record in enumerate(builders.file_examples(spec, path, stats)):
        yield file_number, position, record
    yield _beam().pvalue.TaggedOutput(STATS_TAG, (file_number, stats.to_dict()))


def _offsets(per_file: list[tuple[int, dict]], num_files: int) -> list[int]:
    """The index of each file's first record: the kept records of the files before it."""
    kept = [0] * num_files
    for file_number, stats in per_file:
        kept[file_number] = int(stats['kept'])
    return [0, *itertools.accumulate(kept)][:num_files]


def _with_index(item: tuple[int, int, dict], offsets: list[int]) -> tuple[int, dict]:
    file_number, position, record = item
    index = offsets[file_number] + position
    return index, {**record, 'index': index}


def _write_stats(per_file: list[tuple[int, dict]], path: str) -> None:
    total = DecodeStats()
    for _, stats in sorted(per_file, key=lambda item: item[0]):
        total.update(DecodeStats.from_dict(stats))
    storage.write_text_atomic(path, json.dumps(total.to_dict()))


__all__ = ['RUNNERS', 'BeamPreparation', 'BeamSetupError', 'pipeline_flags']
