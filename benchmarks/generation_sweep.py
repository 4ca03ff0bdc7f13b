"""Text-to-image sampling settings against the honest measures, on a trained task 'text_to_image' workdir.

For each setting (guidance scale, temperature, top-k, top-p) draws `--per-prompt` images for each digit's prompt
'a photo of the number {word}.' (seed 1, as the evaluation's discriminator samples) and reports what training's
evaluation reports for its one setting (`mmjax.tasks.text_to_image.generation_eval`, docs/generative.md): the
independent classifier's prompt accuracy, the real-vs-generated discriminator (the held-out real images against
as many generated ones), and the distinct / training-copy shares of the first 16 samples per prompt. One JSON line
per setting; `--out` also writes them as a JSON list.

With `--draws N` the discriminator is measured N times, draw d on samples drawn with seed 1 + d and folds
shuffled with seed d (`discriminator_accuracy` is then the list, `discriminator_mean` its mean), and a first line
gives the tokenizer's floor for the same N draws: the held-out images against reconstructions of as many
training images drawn with seed d (`mmjax.tasks.vq.reconstruction_realism`, what the evaluation logs as
gen/discriminator_accuracy_reconstructed for d = 0).

    python benchmarks/generation_sweep.py --workdir /tmp/t2i --setting 1.5,1,0,1 --setting 3,1,0,0.8
    python benchmarks/generation_sweep.py --workdir /tmp/t2i --setting 1.5,1,0,1 --draws 3

With `--rerank-with W_clip` (a contrastive workdir) each setting also draws `rerank_factor` x `--per-prompt`
candidates per prompt (seed 1), keeps the `--per-prompt` the contrastive model finds most similar to the prompt,
and reports them as the evaluation does: `prompt_accuracy_reranked`, `discriminator_accuracy_reranked`.

    python benchmarks/generation_sweep.py --workdir /tmp/t2i --setting 1,1,0,1 --rerank-with /tmp/mmjax_demo
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

import mmjax  # noqa: E402
from mmjax.data import pipeline  # noqa: E402
from mmjax.eval import generation as gen_metrics  # noqa: E402
from mmjax.tasks import text_to_image as t2i  # noqa: E402
from mmjax.tasks.vq import reconstruction_realism  # noqa: E402


def setting(text: str) -> tuple[float, float, int, float]:
    """'guidance,temperature,top_k,top_p' -> the tuple."""
    try:
        g, temperature, k, p = text.split(",")
        return float(g), float(temperature), int(k), float(p)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--setting {text!r}: expected guidance,temperature,top_k,top_p "
                                         f"(e.g. 1.5,1,0,1)") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a trained task 'text_to_image' workdir")
    p.add_argument("--setting", type=setting, action="append", required=True,
                   help="guidance,temperature,top_k,top_p (repeatable)")
    p.add_argument("--per-prompt", type=int, default=36, help="images per digit (default 36: 360 in all)")
    p.add_argument("--draws", type=int, default=1, help="discriminator measurements per setting (default 1)")
    p.add_argument("--rerank-with", default="", help="a contrastive workdir: also judge re-ranked samples")
    p.add_argument("--out", default="", help="write the figures as a JSON list here")
    args = p.parse_args(argv)
    loaded = mmjax.load(args.workdir)
    config, enc = loaded.config, loaded.encoder
    if config.task != "text_to_image":
        p.error(f"--workdir {args.workdir} is a task {config.task!r} run, not 'text_to_image'")
    clip = mmjax.load(args.rerank_with) if args.rerank_with else None
    data = t2i._eval_data(config, enc.model, enc.params, enc.mesh, enc.rules, {})
    names, templates = pipeline.zeroshot_prompts(config)
    prompts, labels = [templates[0].format(n) for n in names], np.arange(len(names))
    rows = []
    if args.draws > 1:
        gen = t2i.ImageGenerator(config, enc.model, enc.params, enc.mesh, enc.rules, int(config.eval.batch_size))
        floor = [reconstruction_realism(data, lambda drawn: gen_metrics.to_uint8(gen.decode(
            data["train"]["codes"][drawn].reshape((-1, gen.grid, gen.grid)))) / 255.0, seed=d)
            for d in range(args.draws)]
        rows.append({"tokenizer_floor": floor, "tokenizer_floor_mean": float(np.mean(floor))})
        print(json.dumps({k: np.round(v, 4).tolist() for k, v in rows[-1].items()}), flush=True)
    for guidance, temperature, top_k, top_p in args.setting:
        config.unlock()
        config.model.text_to_image.update(temperature=temperature, top_k=top_k, top_p=top_p)
        config.lock()
        gen = t2i.ImageGenerator(config, enc.model, enc.params, enc.mesh, enc.rules, int(config.eval.batch_size))
        discriminator = []
        for d in range(args.draws):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # guidance on a model without caption dropout: measured anyway
                codes = gen.generate_codes(prompts, args.per_prompt, guidance, seed=1 + d)
            pixels = gen_metrics.to_uint8(gen.decode(codes.reshape((-1,) + codes.shape[2:]))) / 255.0
            discriminator.append(gen_metrics.discriminator_accuracy(data["test"]["pixels"], pixels, seed=d))
            if d == 0:  # accuracy and uniqueness of the first draw, as the evaluation measures them
                kept = min(16, args.per_prompt)
                unique = gen_metrics.uniqueness(codes[:, :kept].reshape(len(prompts), kept, -1),
                                                data["train"]["codes"])
                accuracy = data["classifier"].accuracy(pixels, np.repeat(labels, args.per_prompt))
        row = {"guidance": guidance, "temperature": temperature, "top_k": top_k, "top_p": top_p,
               "prompt_accuracy": accuracy,
               "discriminator_accuracy": discriminator[0] if args.draws == 1 else discriminator, **unique}
        if args.draws > 1:
            row["discriminator_mean"] = float(np.mean(discriminator))
        if clip is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                kept = gen.generate_images(prompts, args.per_prompt, guidance, seed=1, rerank_with=clip) / 255.0
            kept = kept.reshape((-1,) + kept.shape[2:])
            row["prompt_accuracy_reranked"] = data["classifier"].accuracy(kept, np.repeat(labels, args.per_prompt))
            row["discriminator_accuracy_reranked"] = gen_metrics.discriminator_accuracy(data["test"]["pixels"], kept)
        rows.append(row)
        print(json.dumps({k: np.round(v, 4).tolist() if isinstance(v, (float, list)) else v
                          for k, v in row.items()}), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
