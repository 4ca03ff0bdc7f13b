"""`mmjax tokenize --workdir W_vq --out D [--splits ...]`: pre-tokenises the dataset an image tokenizer was trained
on (a labelled dataset, or one caption corpus: a prepared spec or a TFDS dataset, its captions kept).

Every image of every split (of a caption corpus: data.train_split, cropped to its central square as training's
evaluation-mode decode does) goes through the tokenizer once (`mmjax.load(W_vq).encode_tokens`, in batches of
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
from mmjax.data import image_codes, pipeline, sources
from mmjax.errors import MmjaxError
from mmjax.inference import load
from mmjax.models.vq import code_grid
from mmjax.tasks.vq import to_pixels


class TokenizeError(MmjaxError, ValueError):
    """A workdir or dataset `mmjax tokenize` cannot pre-tokenise."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", required=True, help="an image tokenizer's workdir (task 'vq')")
    p.add_argument("--out", required=True, help="a new folder (or bucket URL) for the codes")
    p.add_argument("--batch-size", type=int, default=1024, help="images encoded at a time (default 1024)")
    p.add_argument("--splits", nargs="+", default=None,
                   help="splits to pre-tokenise (default: every split of a labelled dataset; data.train_split of a "
                        "caption corpus)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error (also MMJAX_DEBUG=1)")


def labelled_records(tokenizer, config, split: str, batch_size: int, say):
    """A function returning the records {'codes', 'label', 'index'} of a labelled dataset's `split`."""
    def make():
        source = pipeline.make_source(config, split)
        decode = pipeline.DecodeExample()
        for first, raw in batches(source, batch_size):
            raw = [decode.map(r) for r in raw]
            codes = tokenizer.encode_tokens(np.stack([r["image"] for r in raw]))
            for record, grid in zip(raw, codes):
                yield {"codes": grid.reshape(-1), "label": record["label"], "index": record["index"]}
            say(split, first + len(raw), len(source))
    return make


def corpus_records(tokenizer, config, split: str, batch_size: int, say):
    """A function returning the records {'codes', 'label' -1, 'index', 'captions'} of a caption corpus's `split`;
    each image cropped and resized as training's evaluation-mode decode does (the central square)."""
    def make():
        opened = sources.open_member(sources.members(config)[0], config, split, progress=False)
        decode = pipeline.decode_transform(config)  # data.augment off (checked): the deterministic crop
        rng = np.random.default_rng(0)  # draws only the caption, which is not kept
        for first, raw in batches(opened.source, batch_size):
            records = [opened.to_captioned.map(r) if opened.to_captioned else r for r in raw]
            codes = tokenizer.encode_tokens(to_pixels(np.stack([decode.random_map(r, rng)["image"] for r in records]),
                                                      config))
            for position, (record, grid) in enumerate(zip(records, codes), start=first):
                yield {"codes": grid.reshape(-1), "label": -1, "index": position,
                       "captions": [c if isinstance(c, bytes) else str(c).encode() for c in record["captions"]]}
            say(split, first + len(records), len(opened.source))
    return make


def batches(source, batch_size: int):
    """(first index, [records]) of `source` in order, `batch_size` at a time."""
    for first in range(0, len(source), batch_size):
        yield first, [source[i] for i in range(first, min(first + batch_size, len(source)))]


def main(config, args) -> int:
    del config  # the tokenizer workdir's own config names the data
    if args.batch_size < 1:
        raise TokenizeError(f"--batch-size must be >= 1; got {args.batch_size}")
    tokenizer = load(args.workdir)
    config = tokenizer.config
    if not hasattr(tokenizer, "encode_tokens"):
        raise TokenizeError(f"--workdir {args.workdir} is a task {config.task!r} run, not an image tokenizer "
                            f"(task 'vq': it has no encode_tokens)")
    captioned = pipeline.is_captioned(config)
    if captioned and config.data.augment:
        raise TokenizeError(f"--workdir {args.workdir} was trained with data.augment=True: its images have no one "
                            f"crop to pre-tokenise")
    try:
        dataset = image_codes.dataset_name(config)
    except ValueError as error:
        raise TokenizeError(f"--workdir {args.workdir}: {error}") from None
    started = time.perf_counter()

    def say(split, done, total):
        if not args.quiet:
            print(f"mmjax tokenize: {split} {done}/{total} images ({done / (time.perf_counter() - started):.0f}/s)",
                  file=sys.stderr, flush=True)

    splits = args.splits or ([config.data.train_split] if captioned else pipeline.labelled_dataset(config).SPLITS)
    records = corpus_records if captioned else labelled_records
    side = code_grid(config.model)
    info = {"tokenizer": storage.absolute(args.workdir), "step": int(tokenizer.step), "codebook_size":
            int(config.model.vq.codebook_size), "grid": side, "dataset": dataset}
    written = image_codes.write(args.out, {s: records(tokenizer, config, s, args.batch_size, say) for s in splits},
                                side * side, info)
    counts = ", ".join(f"{n} {s}" for s, n in written["splits"].items())
    print(f"mmjax tokenize: {counts} images as {side}x{side} codes of {args.workdir} (step {tokenizer.step}) "
          f"in {args.out}")
    return 0
