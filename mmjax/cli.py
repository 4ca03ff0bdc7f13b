"""`mmjax train --config C --workdir W [--config.KEY=VALUE ...]` (also `python -m mmjax`); also eval, bench,
compile, convert, prepare, generate and tokenize (`mmjax --help`).

Errors of mmjax's own (`mmjax.errors.MmjaxError`) end as one `mmjax: error: ...` line and the error's exit code
(2 for usage and config, 1 for faults while running), and so does an OSError of the storage (a full disk, a
read-only file system, no permission: exit 1) wherever it is met; any other exception shows its traceback.
`--debug` (or MMJAX_DEBUG=1) shows the traceback of every error.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from jax._src import xla_bridge  # importing JAX starts no backend: the CPU flags can still be set

from mmjax import config as config_lib
from mmjax.commands import bench as bench_cmd
from mmjax.commands import compile as compile_cmd
from mmjax.commands import convert as convert_cmd
from mmjax.commands import eval as eval_cmd
from mmjax.commands import generate as generate_cmd
from mmjax.commands import prepare as prepare_cmd
from mmjax.commands import tokenize as tokenize_cmd
from mmjax.commands import train as train_cmd
from mmjax.errors import MmjaxError, StorageError, is_storage_fault
from mmjax.runtime import cpu


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmjax", description="Sharded multimodal contrastive pretraining.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train (or resume) a config in a workdir",
                       epilog="Any config key can be overridden: --config.train.steps=200")
    t.add_argument("--config", required=True, help="a configs/*.py file (optionally file.py:arg)")
    t.add_argument("--workdir", required=True, help="where checkpoints, metrics and logs go")
    t.add_argument("--quiet", action="store_true", help="no progress lines")
    t.add_argument("--coordinator", default=None,
                   help="host:port of process 0, for a multi-process run (or MMJAX_COORDINATOR); "
                        "TPU VMs and SLURM jobs are detected without it")
    t.add_argument("--num-processes", type=int, default=None, help="(or MMJAX_NUM_PROCESSES)")
    t.add_argument("--process-id", type=int, default=None, help="(or MMJAX_PROCESS_ID)")
    t.add_argument("--stop-at-step", type=int, default=None,
                   help="stop after this step with a checkpoint written; the learning-rate schedule "
                        "still spans train.steps, so a later run on the workdir continues it")
    t.add_argument("--force-unlock", action="store_true",
                   help="take over the workdir's lock even if another run seems to hold it (check first that "
                        "no other run is using the workdir)")
    c = sub.add_parser("compile", help="compile the train step ahead of time for a TPU topology "
                                          "(needs libtpu) and report per-chip memory and FLOPs",
                       epilog="Exit status 1 when the step does not fit the chip's HBM.")
    c.add_argument("--config", required=True, help="a configs/*.py file (optionally file.py:arg)")
    c.add_argument("--topology", required=True, help="v4-N, v5p-N (N TensorCores), v5e-N, v6e-N (N chips)")
    c.add_argument("--num-slices", type=int, default=1, help="slices joined over DCN (mesh.data spans them)")
    c.add_argument("--sample-batch", type=int, default=None,
                   help="rows of a generative task's sampler, compiled too (default train.batch_size; 0: skip it)")
    c.add_argument("--json", default=None, help="also write the report as JSON to this file")
    b = sub.add_parser("bench", help="time the train step on this host's devices with a synthetic batch: "
                                     "samples/s, TFLOP/s per device, MFU, memory",
                       epilog="Any config key can be overridden: --config.train.batch_size=256. A multi-process "
                              "run joins as `mmjax train` does (MMJAX_* variables, TPU VMs, SLURM).")
    b.add_argument("--config", required=True, help="a configs/*.py file (optionally file.py:arg)")
    b.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    b.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    b.add_argument("--json", default=None, help="also write the report as JSON to this file")
    e = sub.add_parser("eval", help="evaluate checkpoints of a workdir (zero-shot, retrieval, linear "
                                    "probe) into W/eval/<step>.json and PNGs")
    e.add_argument("--config", required=True, help="a configs/*.py file: data settings, eval.batch_size")
    e.add_argument("--workdir", required=True, help="a training workdir (read-only on its checkpoints)")
    which = e.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, default=None, help="this checkpoint (default: the latest)")
    which.add_argument("--all", action="store_true", help="every checkpoint in the workdir")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.add_argument("--no-plots", action="store_true", help="write no PNGs")
    v = sub.add_parser("convert", help="import weights of another library into an mmjax workdir")
    vsub = v.add_subparsers(dest="source", required=True)
    oc = vsub.add_parser("open_clip", help="an open_clip / OpenAI CLIP ViT checkpoint (read without torch)")
    oc.add_argument("--model-config", required=True,
                    help="open_clip model config JSON (or HF open_clip_config.json), or a built-in open_clip "
                         "model name when open_clip is installed (e.g. ViT-B-32-quickgelu)")
    oc.add_argument("--checkpoint", required=True, help=".safetensors, or a torch .pt/.bin state dict")
    oc.add_argument("--workdir", required=True, help="a fresh workdir: checkpoints/0 and config.json go there")
    oc.add_argument("--text-ids", choices=("clip_bpe", "raw"), default=None,
                    help="clip_bpe (default unless the config names an HF tokenizer): re-order the token table "
                         "for mmjax's CLIP BPE tokenizer; raw: keep open_clip's token ids")
    oc.add_argument("--bpe-path", default=None, help="CLIP merges file (default: open_clip's bundled one)")
    oc.add_argument("--scan-layers", action="store_true", help="store the blocks stacked (model.scan_layers)")
    for command in (t, c, b, e, oc):
        command.add_argument("--debug", action="store_true",
                             help="show the full traceback of an error (also MMJAX_DEBUG=1)")
    generate_cmd.add_arguments(sub.add_parser("generate", help="one line of generated text (a caption) per image, "
                                                                "from a captioner's workdir (task 'coca')"))
    prepare_cmd.add_arguments(sub.add_parser(
        "prepare", help="prepare a builder spec (webdataset, CSV, COCO) into data_dir as TFDS array_record, bad "
                        "samples left out; in this process or on Apache Beam (DirectRunner, DataflowRunner)"))
    tokenize_cmd.add_arguments(sub.add_parser(
        "tokenize", help="pre-tokenise the dataset an image tokenizer (task 'vq') was trained on: its codes as a "
                         "TFDS dataset that text-to-image training reads with data.codes_dir"))
    return p


def parse_command(argv: Sequence[str]):
    """Parses an `mmjax ...` command line (without the leading `mmjax`) as the real command would, and loads its
    config with the `--config.KEY=VALUE` overrides applied, without running anything or validating against
    devices. Returns (argparse.Namespace, ConfigDict or None for commands without --config). Raises SystemExit
    (argparse) on bad flags and ConfigError on a bad config or override."""
    rest, overrides = config_lib.split_overrides(argv)
    args = _parser().parse_args(rest)
    if not getattr(args, "config", None):
        return args, None
    config = config_lib.load_config_file(args.config)
    return args, config_lib.apply_overrides(config, overrides)


def _announce_cpu_defaults(args) -> None:
    """Sets the CPU XLA flags before JAX creates its CPU backend, and says which defaults are in effect. Once
    JAX's backends exist (`cli.main` called again in one process, as tests and notebooks do) flags would no longer
    apply here and would only reach the processes this one starts, which would then compute differently from it:
    XLA_FLAGS is left as it is."""
    defaults = [] if xla_bridge.backends_are_initialized() else list(cpu.tune_cpu_xla_flags())
    if cpu.CPU_MALLOC_TUNABLE in os.environ.get("GLIBC_TUNABLES", "").split(":"):
        defaults.append(f"GLIBC_TUNABLES={cpu.CPU_MALLOC_TUNABLE}")  # in effect (the entry point set it)
    if defaults and not getattr(args, "quiet", False):
        print(f"mmjax: CPU speed defaults (MMJAX_XLA_CPU_DEFAULTS=1 turns them off): {' '.join(defaults)}")


COMMANDS = {"train": train_cmd.main, "eval": eval_cmd.main, "bench": bench_cmd.main, "compile": compile_cmd.main,
            "prepare": prepare_cmd.main, "generate": generate_cmd.main, "tokenize": tokenize_cmd.main}


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one `mmjax` command line; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["convert"]:
            return convert_cmd.main(_parser().parse_args(argv))
        if argv[:1] in (["train"], ["eval"], ["bench"]):
            _announce_cpu_defaults(_parser().parse_args(config_lib.split_overrides(argv)[0]))
        # Config problems are found before joining a cluster or compiling anything.
        args, config = parse_command(argv)
        return COMMANDS[args.command](config, args) or 0
    except (MmjaxError, OSError) as e:
        if "--debug" in argv or os.environ.get("MMJAX_DEBUG") == "1":
            raise
        if not isinstance(e, MmjaxError):
            if not is_storage_fault(e):  # not the storage's fault: a bug, shown with its traceback
                raise
            e = StorageError.from_os_error(e)
        print(f"mmjax: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (there, PreemptionGuard stops cleanly)
        if "--debug" in argv or os.environ.get("MMJAX_DEBUG") == "1":
            raise
        print(f"mmjax: interrupted (Ctrl-C) during `mmjax {argv[0] if argv else ''}`; checkpoints and results are "
              f"only ever written whole, so nothing already written is damaged", file=sys.stderr)
        return 130


def run() -> int:
    """Entry point of the `mmjax` command (and `python -m mmjax`): `main` on sys.argv, after re-executing the
    process with glibc's transparent huge pages for large blocks on a CPU (`mmjax.runtime.cpu`)."""
    if sys.argv[1:2] in (["train"], ["eval"], ["bench"]):
        cpu.reexec_with_cpu_malloc_tunables()
    return main()


if __name__ == "__main__":
    sys.exit(run())
