"""`mmjax eval --config C --workdir W [--step N | --all]`: evaluates checkpoints of a training workdir.

For each evaluated step it writes `W/eval/<step>.json` (flat keys: zeroshot/top1, zeroshot/top5,
retrieval/i2t/r1|r5|r10, retrieval/t2i/r1|r5|r10, linear_probe/top1, plus linear_probe/l2), prints a
table, and writes PNGs to `W/eval/`: `curves.png` (loss and eval metrics vs step),
`confusion_<step>.png` (zero-shot) and `retrieval_<step>.png` (top-5 images for a few text queries).
A model with an audio tower also gets zeroshot/audio/top1|top5 on the held-out voices' clips (the same figures
`mmjax train` logs); without an image tower that is its whole evaluation (zeroshot/top1 is then the audio's).

Read-only on the checkpoints (safe while training is still writing them): the model comes from
`mmjax.load(W, step)`, i.e. the workdir's own config.json; `--config` (with `--config.KEY=VALUE`
overrides) supplies the data settings (data.name, data.data_dir, ...) and eval.batch_size.

Retrieval on the digits: each test image gets 5 captions from the training caption templates (fixed
seed). Digit captions describe only the class, so a caption counts as a hit for any image of its class.
"""

from __future__ import annotations

import json
import os
import sys

import ml_collections
import numpy as np

from mmjax import config as config_lib

CAPTIONS_PER_IMAGE = 5
CAPTION_SEED = 0
NUM_QUERIES = 4
KEY_ORDER = ("zeroshot/top1", "zeroshot/top5", "zeroshot/audio/top1", "zeroshot/audio/top5",
             "retrieval/i2t/r1", "retrieval/i2t/r5", "retrieval/i2t/r10",
             "retrieval/t2i/r1", "retrieval/t2i/r5", "retrieval/t2i/r10", "linear_probe/top1")


def _data_config(model_config, cli_config):
    """The workdir's config (model, preprocessing) with the data section of the command-line config."""
    cfg = ml_collections.ConfigDict(model_config.to_dict())
    cfg.data = ml_collections.ConfigDict(cli_config.data.to_dict())
    return cfg


def load_eval_data(cfg) -> dict:
    """Everything the evaluators need, preprocessed for the model in `cfg`; with an audio tower also 'clips',
    the held-out voices' clips (`mmjax.data.speech_triples.eval_clips`)."""
    from mmjax.data import pipeline
    from mmjax import evaluators

    test = pipeline.load_eval_split(cfg, "test")
    train = pipeline.load_eval_split(cfg, "train")
    class_names, templates = pipeline.zeroshot_prompts(cfg)
    if cfg.data.name == "digits":
        captions, owners = evaluators.digits_caption_set(test["label"], CAPTIONS_PER_IMAGE, CAPTION_SEED)
    else:  # any dataset module's caption(label, rng)
        caption = pipeline._dataset(cfg).caption
        rng = np.random.default_rng(CAPTION_SEED)
        captions = [caption(int(l), rng) for l in test["label"] for _ in range(CAPTIONS_PER_IMAGE)]
        owners = np.repeat(np.arange(len(test["label"])), CAPTIONS_PER_IMAGE)
    retrieval = {"image": test["image"], "captions": captions, "text_image": owners,
                 "image_group": test["label"]}
    data = {"test": test, "train": train, "class_names": class_names, "templates": templates,
            "retrieval": retrieval}
    if "audio" in config_lib.model_towers(cfg):
        from mmjax.data import speech_triples

        data["clips"] = speech_triples.eval_clips(cfg, pipeline.resolve_data_dir(cfg))
    return data


def evaluate_model(model, data: dict, progress: bool = False) -> tuple[dict, dict]:
    """All evaluators on a `mmjax.load`ed model. Returns (flat metrics, extras for the plots).

    Zero-shot for each tower with a test set (`mmjax.audio_eval.zeroshot_by_tower`: images, and the held-out
    voices' clips when the model has an audio tower); retrieval, linear probe and the contact sheet with an
    image tower. Extras: 'zeroshot_preds' (image predictions or None) and, with images, the contact sheet's."""
    from mmjax import audio_eval, evaluators

    enc, tok = model._encoder, model.tokenizer
    towers = config_lib.model_towers(model.config)
    metrics, image_preds = audio_eval.zeroshot_by_tower(enc, tok, data, towers, progress)
    extras = {"zeroshot_preds": image_preds}
    if "image" not in towers:
        return metrics, extras
    rt, (image_emb, _) = evaluators.retrieval(enc, tok, data["retrieval"], progress)
    metrics.update(rt)
    lp, info = evaluators.linear_probe_eval(enc, data["train"], data["test"], progress)
    metrics.update(lp)
    metrics["linear_probe/l2"] = info["l2"]
    # contact sheet: a few class prompts -> top-5 test images
    names = data["class_names"]
    picks = np.linspace(0, len(names) - 1, min(NUM_QUERIES, len(names))).round().astype(int)
    queries = [data["templates"][0].format(names[c]) for c in picks]
    q_emb = enc.encode_text(tok.encode(queries))
    top = np.argsort(-(q_emb @ image_emb.T), axis=1)[:, :5]
    extras.update(queries=queries, top_idx=top, top_correct=data["test"]["label"][top] == picks[:, None])
    return metrics, extras


def _write_json(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def format_table(results: dict[int, dict]) -> str:
    keys = [k for k in KEY_ORDER if any(k in m for m in results.values())]
    short = [k.replace("retrieval/", "").replace("zeroshot/", "zs/").replace("linear_probe/", "lp/")
             for k in keys]
    widths = [max(6, len(s)) for s in short]
    lines = ["step".rjust(7) + "  " + "  ".join(s.rjust(w) for s, w in zip(short, widths))]
    for step, m in sorted(results.items()):
        cells = [(f"{m[k]:.4f}" if k in m else "-").rjust(w) for k, w in zip(keys, widths)]
        lines.append(str(step).rjust(7) + "  " + "  ".join(cells))
    return "\n".join(lines)


def run(config, workdir: str, step: int | None = None, all_steps: bool = False, progress: bool = True,
        plots: bool = True, out=print) -> dict[int, dict]:
    """Evaluates the latest checkpoint of `workdir` (or `step`, or every one); returns {step: metrics}."""
    import mmjax
    from mmjax.checkpoint import Checkpointer

    workdir = os.path.abspath(workdir)
    if not os.path.exists(os.path.join(workdir, "config.json")):
        raise ValueError(f"{workdir!r} is not an mmjax workdir: no config.json in it")
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise ValueError(f"no checkpoints in {ckpt_dir}")
    ckpt = Checkpointer(ckpt_dir, async_save=False, read_only=True)
    available = sorted(ckpt.all_steps())
    ckpt.close()
    if not available:
        raise ValueError(f"no checkpoints in {ckpt_dir}")
    if all_steps:
        steps = available
    elif step is not None:
        if step not in available:
            raise ValueError(f"no checkpoint at step {step} in {ckpt_dir}; available: {available}")
        steps = [step]
    else:
        steps = [available[-1]]

    eval_dir = os.path.join(workdir, "eval")
    os.makedirs(eval_dir, exist_ok=True)
    data, results = None, {}
    for s in steps:
        try:
            model = mmjax.load(workdir, s)
        except (FileNotFoundError, ValueError) as e:  # deleted by keep-N while we were evaluating
            if len(steps) == 1:
                raise ValueError(str(e)) from e
            out(f"mmjax: skipping checkpoint {s}: {e}")
            continue
        model._encoder.batch_size = max(1, int(config.eval.batch_size))  # 1 device: no shard rounding
        if data is None:
            data = load_eval_data(_data_config(model.config, config))
        if progress:
            out(f"mmjax: evaluating checkpoint {s} of {workdir}")
        metrics, extras = evaluate_model(model, data, progress)
        results[s] = metrics
        _write_json(os.path.join(eval_dir, f"{s}.json"), {"step": s, **metrics})
        if plots and extras["zeroshot_preds"] is not None:  # the image plots
            from mmjax import plots as plots_lib

            plots_lib.confusion_matrix(data["test"]["label"], extras["zeroshot_preds"], data["class_names"],
                                       os.path.join(eval_dir, f"confusion_{s}.png"),
                                       title=f"zero-shot confusion, step {s}")
            plots_lib.contact_sheet(extras["queries"], data["test"]["image"], extras["top_idx"],
                                    os.path.join(eval_dir, f"retrieval_{s}.png"), extras["top_correct"])
    if plots and results:
        from mmjax import plots as plots_lib

        plots_lib.training_curves(workdir, os.path.join(eval_dir, "curves.png"))
    if results:
        out(format_table(results))
        out(f"mmjax: results in {eval_dir}/")
    return results


def main(config, args) -> None:
    run(config, args.workdir, step=args.step, all_steps=args.all, progress=not args.quiet,
        plots=not args.no_plots, out=lambda s: print(s, flush=True))


if __name__ == "__main__":  # pragma: no cover
    from mmjax.cli import main as cli_main

    sys.exit(cli_main(["eval", *sys.argv[1:]]))
