"""What evaluating a contrastive model means: the data every evaluator needs, and all evaluators on a model.

`load_eval_data(config)` gathers the held-out split, the train split (for the linear probe), the class prompts,
the retrieval captions and, with an audio tower, the held-out voices' clips. `evaluate_model(model, data)` runs
zero-shot for every tower, retrieval and the linear probe. Training's evaluation and `mmjax eval` both use them,
so the numbers are the same.

Retrieval on the digits: each test image gets 5 captions from the training caption templates (fixed seed).
Digit captions describe only the class, so a caption counts as a hit for any image of its class.
"""

from __future__ import annotations

import numpy as np

from mmjax import config as config_lib
from mmjax.data import pipeline, speech_triples
from mmjax.eval.linear_probe import linear_probe_eval
from mmjax.eval.retrieval import digits_caption_set, retrieval
from mmjax.eval.zeroshot import zeroshot_by_tower

CAPTIONS_PER_IMAGE = 5
CAPTION_SEED = 0
NUM_QUERIES = 4
KEY_ORDER = ("zeroshot/top1", "zeroshot/top5", "zeroshot/audio/top1", "zeroshot/audio/top5",
             "retrieval/i2t/r1", "retrieval/i2t/r5", "retrieval/i2t/r10",
             "retrieval/t2i/r1", "retrieval/t2i/r5", "retrieval/t2i/r10", "linear_probe/top1",
             "linear_probe/random_init/top1")



def load_eval_data(cfg) -> dict:
    """Everything the evaluators need, preprocessed for the model in `cfg`; with an audio tower also 'clips',
    the held-out voices' clips (`mmjax.data.speech_triples.eval_clips`)."""
    test = pipeline.load_eval_split(cfg, "test")
    train = pipeline.load_eval_split(cfg, "train")
    class_names, templates = pipeline.zeroshot_prompts(cfg)
    if cfg.data.name == "digits":
        captions, owners = digits_caption_set(test["label"], CAPTIONS_PER_IMAGE, CAPTION_SEED)
    else:  # any dataset module's caption(label, rng)
        caption = pipeline.labelled_dataset(cfg).caption
        rng = np.random.default_rng(CAPTION_SEED)
        captions = [caption(int(l), rng) for l in test["label"] for _ in range(CAPTIONS_PER_IMAGE)]
        owners = np.repeat(np.arange(len(test["label"])), CAPTIONS_PER_IMAGE)
    retrieval = {"image": test["image"], "captions": captions, "text_image": owners,
                 "image_group": test["label"]}
    data = {"test": test, "train": train, "class_names": class_names, "templates": templates,
            "retrieval": retrieval}
    if "audio" in config_lib.model_towers(cfg):
        data["clips"] = speech_triples.eval_clips(cfg, config_lib.data_dir(cfg))
    return data


def evaluate_model(model, data: dict, progress: bool = False) -> tuple[dict, dict]:
    """All evaluators on a `mmjax.load`ed model. Returns (flat metrics, extras for the plots).

    Zero-shot for each tower with a test set (`mmjax.eval.audio.zeroshot_by_tower`: images, and the held-out
    voices' clips when the model has an audio tower); retrieval, linear probe and the contact sheet with an
    image tower. Extras: 'zeroshot_preds' (image predictions or None) and, with images, the contact sheet's."""
    enc, tok = model.encoder, model.tokenizer
    towers = config_lib.model_towers(model.config)
    metrics, image_preds = zeroshot_by_tower(enc, tok, data, towers, progress)
    extras = {"zeroshot_preds": image_preds}
    if "image" not in towers:
        return metrics, extras
    rt, (image_emb, _) = retrieval(enc, tok, data["retrieval"], progress)
    metrics.update(rt)
    lp, info = linear_probe_eval(enc, data["train"], data["test"], progress)
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


def format_table(results: dict[int, dict]) -> str:
    keys = [k for k in KEY_ORDER if any(k in m for m in results.values())]
    keys += sorted({k for m in results.values() for k, v in m.items()
                    if k not in keys and k != "step" and isinstance(v, (int, float))})
    short = [k.replace("retrieval/", "").replace("zeroshot/", "zs/").replace("linear_probe/", "lp/")
             for k in keys]
    widths = [max(6, len(s)) for s in short]
    lines = ["step".rjust(7) + "  " + "  ".join(s.rjust(w) for s, w in zip(short, widths))]
    for step, m in sorted(results.items()):
        cells = [(f"{m[k]:.4f}" if k in m else "-").rjust(w) for k, w in zip(keys, widths)]
        lines.append(str(step).rjust(7) + "  " + "  ".join(cells))
    return "\n".join(lines)
