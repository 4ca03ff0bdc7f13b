"""`mmjax prepare --spec S --data-dir D [--runner DirectRunner|DataflowRunner ...]`: prepares a builder spec
(webdataset shards, a CSV, COCO captions; `mmjax/data/builders.py`) into `D/<name>/1.0.0/` (TFDS array_record, every
image fully decoded and bad samples left out and counted), as `mmjax train` does on first use.

Without --runner it prepares in this process. With one it runs TFDS's Apache Beam support
(`mmjax/data/beam_prepare.py`): `--runner DirectRunner --num-workers N` on N local worker processes,
`--runner DataflowRunner --project P --region R --temp-location gs://... [--num-workers ...]` on Google Cloud
Dataflow (the spec's files and D on gs://). Both write the same records and counts.
"""

from __future__ import annotations

import argparse

from mmjax import storage
from mmjax.data import beam_prepare, builders, sources
from mmjax.data.decode import DataFileNotFoundError, DataSpecError
from mmjax.errors import MmjaxError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `mmjax prepare` (the parser `mmjax/cli.py` makes for it)."""
    parser.add_argument("--spec", required=True,
                        help="a builder spec: a JSON file (local, gs:// or s3://; relative paths in it are read from "
                             "its folder) or an inline JSON object")
    parser.add_argument("--data-dir", required=True, help="where <name>/1.0.0/ is written: a local folder or gs://")
    parser.add_argument("--runner", choices=beam_prepare.RUNNERS, default=None,
                        help="prepare on Apache Beam with this runner (pip install apache-beam; for Dataflow "
                             "apache-beam[gcp]); default: in this process")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="DirectRunner: local worker processes (default 1); DataflowRunner: initial workers")
    beam = parser.add_argument_group("DataflowRunner (Beam pipeline options)")
    beam.add_argument("--project", default=None, help="the Google Cloud project")
    beam.add_argument("--region", default=None, help="e.g. us-central1")
    beam.add_argument("--temp-location", default=None, help="a gs:// folder for Dataflow's temporary files")
    beam.add_argument("--max-num-workers", type=int, default=None, help="the most workers autoscaling may use")
    beam.add_argument("--machine-type", default=None, help="the workers' machine type, e.g. n2-standard-8")
    beam.add_argument("--setup-file", default=None,
                      help="a setup.py that installs mmjax on the workers (this repository's ./setup.py)")
    parser.add_argument("--beam-option", action="append", default=[], metavar="--FLAG=VALUE",
                        help="a further Beam pipeline flag, passed as given (repeat for more), e.g. "
                             "--beam-option=--sdk_container_image=IMAGE")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error (also MMJAX_DEBUG=1)")


def load_spec(text: str) -> dict:
    """The spec that --spec names (a file / URL, or inline JSON); a 'tfds:' source or an unreadable one raises
    DataSpecError naming it."""
    try:
        member = sources.parse_source(text)
    except MmjaxError:
        raise
    except FileNotFoundError as error:
        raise DataFileNotFoundError(f"--spec {text}: {error}") from None
    except ValueError as error:
        raise DataSpecError(f"--spec {text}: {error}") from None
    if member.kind != "spec":
        raise DataSpecError(f"--spec {text}: give a builder spec (a JSON file or object); a TFDS dataset is prepared "
                            f"by TFDS itself")
    return dict(member.spec)


def beam_preparation(args) -> beam_prepare.BeamPreparation | None:
    """The Beam runner and pipeline flags the command line asks for, or None (prepare in this process)."""
    if args.runner is None:
        dataflow_only = [f"--{k.replace('_', '-')}" for k in ("project", "region", "temp_location", "max_num_workers",
                                                               "machine_type", "setup_file") if getattr(args, k)]
        if dataflow_only or args.num_workers or args.beam_option:
            flags = dataflow_only + (["--num-workers"] if args.num_workers else []) + (
                ["--beam-option"] if args.beam_option else [])
            raise beam_prepare.BeamSetupError(f"{', '.join(flags)} configure a Beam runner: add --runner "
                                              f"DirectRunner or --runner DataflowRunner")
        return None
    flags = beam_prepare.pipeline_flags(
        args.runner, num_workers=args.num_workers, project=args.project, region=args.region,
        temp_location=args.temp_location, machine_type=args.machine_type, max_num_workers=args.max_num_workers,
        setup_file=args.setup_file, extra=args.beam_option)
    return beam_prepare.BeamPreparation(args.runner, flags)


def main(config, args) -> int:
    """Runs `mmjax prepare` (`config` is None: the command has no --config); prints the counts per split."""
    del config
    spec = load_spec(args.spec)
    beam = beam_preparation(args)
    data_dir = builders.check_data_dir(args.data_dir)
    storage.reachable(data_dir, "--data-dir")
    stats = builders.prepare_dataset(spec, data_dir, progress=not args.quiet, beam=beam)
    folder = builders.dataset_dir(spec["name"], data_dir)
    for split, counts in sorted(stats.items()):
        print(f"mmjax: prepared {spec['name']}/{split}: {counts.summary()}")
    print(f"mmjax: dataset in {folder} (decode counts in {builders.STATS_FILE})")
    return 0
