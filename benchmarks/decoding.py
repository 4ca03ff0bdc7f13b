"""Decoding speed: the KV-cached decoder against full recomputation, and against open_clip CoCa's `generate`.

One text decoder at open_clip CoCa ViT-B/32's multimodal-decoder shape (width 512, 8 heads, 12 layers, every one
cross-attending to 256 image tokens, vocab 49,408; float32, one CPU device), random weights, `--batch` right-padded
prompts of `--prompt` tokens, `--new` new tokens (EOS never stops a row early: all rows decode every token):
  cached      `mmjax.models.decoding.greedy`: the prompt once, then one token per step over the KV cache
  recompute   the same decoder without a cache: at step t the whole sequence so far (padded to a fixed length,
              causal mask) is run again and token t read off (what decoding costs without a cache)
  open_clip   open_clip's CoCa `generate` (greedy: top-k 1) on the same shapes, when open_clip is installed
each jitted / warmed up once, then alternating `--repeats` times, at each of the `--batch` sizes (open_clip at
the `--open-clip-batch` ones). Prints one row per batch: tokens/s (batch x new tokens / wall seconds, medians) and
the cached speed-ups; `--out` writes them as JSON ({"shape": flags, "by_batch": {B: runs}}).

    python benchmarks/decoding.py --repeats 5                    # batches 1, 4 and 16; open_clip at 4
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mmjax.models import decoding  # noqa: E402
from mmjax.models.decoder import TextDecoder, decoder_logits_fn  # noqa: E402

NEVER = 10 ** 6  # an EOS id no model emits: every row decodes all tokens


def build(args):
    decoder = TextDecoder(vocab_size=49408, max_len=args.prompt + args.new, width=512, depth=args.depth,
                          num_heads=8, mlp_dim=2048, cross_attention_every=1)
    rng = np.random.default_rng(0)
    prompts = jnp.asarray(rng.integers(3, 49000, (args.batch, args.prompt)), jnp.int32)
    media = jnp.asarray(rng.normal(size=(args.batch, 256, 512)), jnp.float32)
    variables = decoder.init(jax.random.key(0), prompts, media=media)
    return decoder, variables, prompts, media


def cached_fn(decoder, args):
    generate = functools.partial(decoding.greedy, decoder_logits_fn(decoder), max_new_tokens=args.new,
                                 eos_id=NEVER)

    @jax.jit
    def run(variables, prompts, media):
        cache = decoder.init_cache(prompts.shape[0], args.prompt + args.new, media=media)
        return generate(variables, prompts, cache).tokens
    return run


def recompute_fn(decoder, args):
    total = args.prompt + args.new

    @jax.jit
    def run(variables, prompts, media):
        tokens = jnp.zeros((prompts.shape[0], total), jnp.int32).at[:, :args.prompt].set(prompts)

        def step(t, tokens):
            logits = decoder.apply(variables, tokens, media=media)  # the whole sequence, again
            nxt = jnp.argmax(logits[:, args.prompt + t - 1], axis=-1).astype(jnp.int32)
            return tokens.at[:, args.prompt + t].set(nxt)
        return jax.lax.fori_loop(0, args.new, step, tokens)[:, args.prompt:]
    return run


def open_clip_fn(args):
    """open_clip CoCa ViT-B/32 `generate` on `args.batch` random images (None when open_clip is missing)."""
    try:
        import torch  # optional: the `openclip` extra
        for op in ("nms", "qnms"):  # a CPU torch beside a torchvision without its compiled ops
            if not hasattr(torch.ops.torchvision, op):
                torch.library.define(f"torchvision::{op}",
                                     "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import open_clip  # optional: the `openclip` extra
    except ImportError:
        return None
    torch.manual_seed(0)
    model = open_clip.create_model("coca_ViT-B-32").eval()
    images = torch.randn(args.batch, 3, 224, 224)

    def run():
        with torch.no_grad():
            # SOT + `new` tokens; EOS suppressed until the last one (which open_clip forces to be EOS)
            return model.generate(images, seq_len=args.new + 1, generation_type="top_k", top_k=1,
                                  min_seq_len=args.new)
    return run


def timed(fn) -> float:
    start = time.perf_counter()
    out = fn()
    jax.block_until_ready(out) if not hasattr(out, "numpy") else None
    return time.perf_counter() - start


def measure(args, batch: int, with_open_clip: bool) -> dict:
    """The runs at one batch size, alternating: {name: {median_s, tokens_per_s}} and the cached speed-ups."""
    args = argparse.Namespace(**{**vars(args), "batch": batch})
    decoder, variables, prompts, media = build(args)
    runs = {"cached": functools.partial(cached_fn(decoder, args), variables, prompts, media),
            "recompute": functools.partial(recompute_fn(decoder, args), variables, prompts, media)}
    np.testing.assert_array_equal(np.asarray(runs["cached"]()), np.asarray(runs["recompute"]()))  # same tokens
    theirs = open_clip_fn(args) if with_open_clip else None
    if theirs is not None:
        runs["open_clip"] = theirs
        theirs()  # warm-up
    times = {name: [] for name in runs}
    for r in range(args.repeats):
        order = list(runs)[r % len(runs):] + list(runs)[:r % len(runs)]
        for name in order:
            times[name].append(timed(runs[name]))
    tokens = batch * args.new
    result = {name: {"median_s": statistics.median(t), "tokens_per_s": tokens / statistics.median(t)}
              for name, t in times.items()}
    result["cached_speedup_vs_recompute"] = result["recompute"]["median_s"] / result["cached"]["median_s"]
    if "open_clip" in result:
        result["cached_speedup_vs_open_clip"] = result["open_clip"]["median_s"] / result["cached"]["median_s"]
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16], help="batch sizes, one measurement each")
    p.add_argument("--prompt", type=int, default=8)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--open-clip-batch", type=int, nargs="*", default=[4],
                   help="the batch sizes at which open_clip's generate joins (it is ~40x slower)")
    p.add_argument("--no-open-clip", action="store_true")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    if min(args.batch) < 1 or args.repeats < 1:
        p.error(f"--batch and --repeats must be >= 1; got --batch {args.batch} --repeats {args.repeats}")
    results = {}
    print(f"{args.new} new tokens after a {args.prompt}-token prompt, depth {args.depth}, medians of {args.repeats}:")
    print(f"{'batch':>5} {'cached tok/s':>13} {'recompute tok/s':>16} {'cached/recompute':>17} "
          f"{'open_clip tok/s':>16} {'cached/open_clip':>17}", flush=True)
    for batch in args.batch:
        r = results[batch] = measure(args, batch, not args.no_open_clip and batch in args.open_clip_batch)
        theirs = (f"{r['open_clip']['tokens_per_s']:16.1f} {r['cached_speedup_vs_open_clip']:16.1f}x"
                  if "open_clip" in r else f"{'-':>16} {'-':>17}")
        print(f"{batch:5d} {r['cached']['tokens_per_s']:13.1f} {r['recompute']['tokens_per_s']:16.1f} "
              f"{r['cached_speedup_vs_recompute']:16.1f}x {theirs}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"shape": vars(args), "by_batch": {str(b): r for b, r in results.items()}}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
