"""`mmjax tokenize --workdir W_vq --out D`: pre-tokenises the labelled dataset an image tokenizer was trained on.

Every image of every split goes through the tokenizer once (`mmjax.load(W_vq).encode_tokens`, in batches of
`--batch-size`, with a progress line per batch) and its codes are written as a TFDS dataset under D
(`mmjax/data/image_codes.py`: codes, label and index per record, and codes.json naming the tokenizer and its
checkpoint). A text-to-image run then reads codes instead of images with `--config.data.codes_dir=D` and no longer
runs the tokenizer in its steps; it refuses codes of another tokenizer or checkpoint than the one it loads.

    mmjax tokenize --workdir /tmp/t2i/tokenizer --out /tmp/digit_codes
    mmjax train --config configs/text_to_image_digits.py --config.image_tokenizer.workdir=/tmp/t2i/tokenizer \\
        --config.data.codes_dir=/tmp/digit_codes --workdir /tmp/t2i_codes
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from mmjax import storage
from mmjax.data import image_codes, pipeline
from mmjax.errors import MmjaxError
from mmjax.inference import load
from mmjax.models.vq import code_grid


class TokenizeError(MmjaxError, ValueError):
    """A workdir or dataset `mmjax tokenize` cannot pre-tokenise."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", required=True, help="an image tokenizer's workdir (task 'vq')")
    p.add_argument("--out", required=True, help="a new folder (or bucket URL) for the codes")
    p.add_argument("--batch-size", type=int, default=1024, help="images encoded at a time (default 1024)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error (also MMJAX_DEBUG=1)")


def split_records(tokenizer, config, split: str, batch_size: int, say):
    """A function returning the records {'codes', 'label', 'index'} of `split`, encoded `batch_size` at a time."""
    def make():
        source = pipeline.make_source(config, split)
        decode = pipeline.DecodeExample()
        start = time.perf_counter()
        for first in range(0, len(source), batch_size):
            raw = [decode.map(source[i]) for i in range(first, min(first + batch_size, len(source)))]
            codes = tokenizer.encode_tokens(np.stack([r["image"] for r in raw]))
            for record, grid in zip(raw, codes):
                yield {"codes": grid.reshape(-1), "label": record["label"], "index": record["index"]}
            done = first + len(raw)
            say(f"mmjax tokenize: {split} {done}/{len(source)} images ({done / (time.perf_counter() - start):.0f}/s)")
    return make


def main(config, args) -> int:
    del config  # the tokenizer workdir's own config names the data
    if args.batch_size < 1:
        raise TokenizeError(f"--batch-size must be >= 1; got {args.batch_size}")
    tokenizer = load(args.workdir)
    config = tokenizer.config
    if not hasattr(tokenizer, "encode_tokens"):
        raise TokenizeError(f"--workdir {args.workdir} is a task {config.task!r} run, not an image tokenizer "
                            f"(task 'vq': it has no encode_tokens)")
    if pipeline.is_captioned(config):
        raise TokenizeError(f"--workdir {args.workdir} was trained on caption corpus data.name="
                            f"{config.data.name!r}; mmjax tokenize pre-tokenises labelled datasets "
                            f"({sorted(pipeline.DATASETS)})")

    def say(line):
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    splits, side = pipeline.labelled_dataset(config).SPLITS, code_grid(config.model)
    info = {"tokenizer": storage.absolute(args.workdir), "step": int(tokenizer.step), "codebook_size":
            int(config.model.vq.codebook_size), "grid": side, "dataset": config.data.name}
    written = image_codes.write(args.out, {s: split_records(tokenizer, config, s, args.batch_size, say)
                                           for s in splits}, side * side, info)
    counts = ", ".join(f"{n} {s}" for s, n in written["splits"].items())
    print(f"mmjax tokenize: {counts} images as {side}x{side} codes of {args.workdir} (step {tokenizer.step}) "
          f"in {args.out}")
    return 0
