"""`mmjax train --config C --workdir W [--config.KEY=VALUE ...]` (also `python -m mmjax`); also eval, bench,
compile and convert (`mmjax --help`)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence


def _split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separates `--config.a.b=v` / `--config.a.b v` overrides from the other arguments."""
    rest, overrides = [], []
    argv = list(argv)
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            if "=" in arg:
                overrides.append(arg[2:])
            elif i + 1 < len(argv):
                overrides.append(f"{arg[2:]}={argv[i + 1]}")
                i += 1
            else:
                overrides.append(arg[2:])
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


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
    c = sub.add_parser("compile", help="compile the train step ahead of time for a TPU topology "
                                          "(needs libtpu) and report per-chip memory and FLOPs",
                       epilog="Exit status 1 when the step does not fit the chip's HBM.")
    c.add_argument("--config", required=True, help="a configs/*.py file (optionally file.py:arg)")
    c.add_argument("--topology", required=True, help="v4-N, v5p-N (N TensorCores), v5e-N, v6e-N (N chips)")
    c.add_argument("--num-slices", type=int, default=1, help="slices joined over DCN (mesh.data spans them)")
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
    return p


def parse_command(argv: Sequence[str]):
    """Parses an `mmjax ...` command line (without the leading `mmjax`) as the real command would, and loads its
    config with the `--config.KEY=VALUE` overrides applied, without running anything or validating against
    devices. Returns (argparse.Namespace, ConfigDict or None for commands without --config). Raises SystemExit
    (argparse) on bad flags and ConfigError on a bad config or override."""
    rest, overrides = _split_overrides(argv)
    args = _parser().parse_args(rest)
    if not getattr(args, "config", None):
        return args, None
    from mmjax import config as config_lib

    config = config_lib.load_config_file(args.config)
    return args, config_lib.apply_overrides(config, overrides)


def _convert(args) -> int:
    from mmjax.convert import ConversionError, convert_open_clip
    from mmjax.torch_files import UnsafeCheckpointError

    try:
        convert_open_clip(args.model_config, args.checkpoint, args.workdir, text_ids=args.text_ids,
                          bpe_path=args.bpe_path, scan_layers=args.scan_layers)
    except (ConversionError, UnsafeCheckpointError, FileNotFoundError, ValueError) as e:
        print(f"mmjax: error: {e}", file=sys.stderr)
        return 2
    return 0


def run() -> int:
    """Entry point of the `mmjax` command (and `python -m mmjax`): `main` on sys.argv.

    For train, eval and bench on a CPU it first re-executes the process with glibc's transparent huge pages for large
    blocks (`mmjax.speed.cpu_malloc_tunables`; MMJAX_XLA_CPU_DEFAULTS=1 turns that off).
    """
    if sys.argv[1:2] in (["train"], ["eval"], ["bench"]):
        from mmjax import speed

        speed.reexec_with_cpu_malloc_tunables()
    return main()


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    rest, overrides = _split_overrides(argv)
    args = _parser().parse_args(rest)
    if args.command == "convert":
        return _convert(args)

    from mmjax import config as config_lib
    from mmjax import distributed
    from mmjax import speed

    if args.command in ("train", "eval", "bench"):
        defaults = list(speed.tune_cpu_xla_flags())  # before JAX creates its CPU backend
        if speed.CPU_MALLOC_TUNABLE in os.environ.get("GLIBC_TUNABLES", "").split(":"):
            defaults.append(f"GLIBC_TUNABLES={speed.CPU_MALLOC_TUNABLE}")  # in effect (`run` sets it)
        if defaults and not getattr(args, "quiet", False):
            print(f"mmjax: CPU speed defaults (MMJAX_XLA_CPU_DEFAULTS=1 turns them off): {' '.join(defaults)}")
    from mmjax.checkpoint import CheckpointMismatchError, CheckpointWriteError
    from mmjax.health import NonFiniteError

    try:
        # Config problems are found before joining a cluster or compiling anything.
        config = config_lib.load_config_file(args.config)
        config = config_lib.apply_overrides(config, overrides)
        if args.command == "train":
            distributed.initialize(args.coordinator, args.num_processes, args.process_id)
            from mmjax.train import train

            train(config, args.workdir, stop_at_step=args.stop_at_step, verbose=not args.quiet)
        elif args.command == "bench":
            distributed.initialize()
            from mmjax import bench

            return bench.run(config, args.steps, args.warmup, args.json)
        elif args.command == "compile":
            from mmjax import compile as compile_lib

            compile_lib.use_cpu_host()

            return compile_lib.run(config, args.topology, args.num_slices, args.json)
        elif args.command == "eval":
            from mmjax import eval_cmd

            eval_cmd.main(config, args)
    except (config_lib.ConfigError, CheckpointMismatchError, ValueError) as e:
        print(f"mmjax: error: {e}", file=sys.stderr)
        return 2
    except (CheckpointWriteError, NonFiniteError) as e:
        print(f"mmjax: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
