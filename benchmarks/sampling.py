"""Text-to-image sampling speed: images/s with the KV cache against full recomputation, on the CPU.

The model of `configs/text_to_image_digits.py` at a larger shape (random weights, float32, one CPU device): 32-token
captions, 64 image codes (8 x 8 from a 32 px tokenizer), a generator of `--depth` blocks of width `--width`, 1,024
codes, classifier-free guidance at scale `--guidance` (two cache rows per image). `--batch` images per call:
  cached      `mmjax.models.text_to_image.sample_codes`, what `mmjax generate` and the eval run: the caption once,
              then one code per step over the KV cache
  recompute   the same generator without a cache: at step t the caption and all codes so far (fixed length, causal
              mask, `image_logits`) run again for both guidance halves, and code t is drawn from the guided logits
Both draw code t with `jax.random.fold_in(key, t)` over the decoder's whole vocabulary (non-image columns at -inf), so
they draw the same codes up to float rounding; with --top-k 1 (greedy) the script checks they agree. Each is
jitted and warmed up once, then they alternate `--repeats` times; prints images/s (medians), `--out` writes JSON.

    python benchmarks/sampling.py --repeats 3
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

from mmjax import config as config_lib  # noqa: E402
from mmjax.config import PAD_ID  # noqa: E402
from mmjax.models import decoding  # noqa: E402
from mmjax.models.text_to_image import build_text_to_image_model, sample_codes  # noqa: E402


def build(args):
    config = config_lib.load_config_file(os.path.join(ROOT, "configs", "text_to_image_digits.py"))
    config.model.image.image_size = 32
    config.model.text.max_len = 32
    config.model.vq.update(widths=(32, 64, 64), codebook_size=1024)
    config.model.text_to_image.update(width=args.width, depth=args.depth, num_heads=args.width // 64,
                                      mlp_dim=4 * args.width, image_vocab=1024)
    model = build_text_to_image_model(config.model)
    rng = np.random.default_rng(0)
    text = jnp.asarray(rng.integers(3, 300, (args.batch, model.text_len)), jnp.int32)
    images = jnp.zeros((1, 32, 32, int(config.model.image.channels)), jnp.float32)
    params = model.init(jax.random.key(0), {"image": images, "text": text[:1]})["params"]
    return model, params, text


def cached_fn(model, args):
    return jax.jit(functools.partial(sample_codes, model, guidance=args.guidance, top_k=args.top_k))


def recompute_fn(model, args):
    n, fields = model.image_tokens, model.generator_fields()
    columns = -(-fields["vocab_size"] // fields["vocab_multiple"]) * fields["vocab_multiple"]  # the decoder's logits

    @jax.jit
    def run(params, text, key):
        blank = jnp.full_like(text, PAD_ID)

        def step(t, codes):
            both = model.apply({"params": params}, jnp.concatenate([text, blank]), jnp.concatenate([codes, codes]),
                               method="image_logits")  # every position, again, for both halves
            cond, uncond = jnp.split(both[:, t], 2)
            guided = uncond + args.guidance * (cond - uncond)
            # drawn over the decoder's whole vocabulary, the other columns at -inf, as the cached sampler draws
            logits = jnp.full((guided.shape[0], columns), -jnp.inf).at[
                :, model.text_vocab:model.text_vocab + model.image_vocab].set(guided)
            token = decoding.sample_tokens(jax.random.fold_in(key, t), logits, 1.0, args.top_k, 1.0)
            return codes.at[:, t].set(token.astype(jnp.int32) - model.text_vocab)
        return jax.lax.fori_loop(0, n, step, jnp.zeros((text.shape[0], n), jnp.int32))
    return run


def timed(fn) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--top-k", type=int, default=0, help="0: full sampling; 1: greedy (the two paths then agree)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    if args.guidance == 1.0:
        p.error("--guidance 1 has no unconditional half; the recompute path here is written for guidance")
    model, params, text = build(args)
    key = jax.random.key(1)
    runs = {"cached": functools.partial(cached_fn(model, args), params, text, key),
            "recompute": functools.partial(recompute_fn(model, args), params, text, key)}
    first = {name: np.asarray(fn()) for name, fn in runs.items()}  # also the warm-up (compiles)
    agree = float(np.mean(first["cached"] == first["recompute"]))
    if args.top_k == 1 and agree < 0.99:
        raise SystemExit(f"greedy codes of the two paths agree on only {agree:.1%}")
    times = {name: [] for name in runs}
    for r in range(args.repeats):
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            times[name].append(timed(runs[name]))
    result = {name: {"median_s": statistics.median(t), "images_per_s": args.batch / statistics.median(t)}
              for name, t in times.items()}
    result["cached_speedup_vs_recompute"] = result["recompute"]["median_s"] / result["cached"]["median_s"]
    result["codes_agree"] = agree
    result["shape"] = dict(vars(args), image_tokens=model.image_tokens, text_len=model.text_len)
    for name in runs:
        print(f"{name:>10}: {result[name]['images_per_s']:8.2f} images/s ({result[name]['median_s']:.3f} s for "
              f"{args.batch} images of {model.image_tokens} codes, median of {args.repeats})")
    print(f"cached is {result['cached_speedup_vs_recompute']:.1f}x faster than recomputation "
          f"(codes agree at {agree:.1%} of positions{'; greedy' if args.top_k == 1 else ', sampled'})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
