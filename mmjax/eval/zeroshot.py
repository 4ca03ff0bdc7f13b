"""Zero-shot classification for every tower: images and the held-out voices' spoken-digit clips against the
class prompts (class embedding = mean of its prompt embeddings, re-normalised).

    zeroshot_metrics(emb, class_emb, labels)  -> {'zeroshot/top1', 'zeroshot/top5'}, predictions
    zeroshot_by_tower(encoder, tokenizer, data, towers) -> what training logs and `mmjax eval` writes
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mmjax.eval.encoder import TowerEncoder, embed, require_fields


def zeroshot_weights(encoder: TowerEncoder, tokenizer, class_names: Sequence[str],
                     templates: Sequence[str]) -> np.ndarray:
    """Class embeddings [C, D]: each class's prompt embeddings averaged, then re-normalised."""
    prompts = [t.format(c) for c in class_names for t in templates]
    emb = encoder.encode_text(tokenizer.encode(prompts)).reshape(len(class_names), len(templates), -1)
    w = emb.mean(axis=1)
    return w / np.linalg.norm(w, axis=-1, keepdims=True)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows whose label is among the k largest logits."""
    topk = np.argsort(-logits, axis=-1)[:, :k]
    return float(np.mean(np.any(topk == labels[:, None], axis=-1)))


def zeroshot_metrics(image_emb: np.ndarray, class_emb: np.ndarray, labels: np.ndarray):
    """image_emb [N, D]; class_emb [C, D] (or [C, T, D]: per-template embeddings, averaged per class and
    re-normalised); labels [N]. Returns ({'zeroshot/top1', 'zeroshot/top5' (if C > 5)}, predictions [N])."""
    w = np.asarray(class_emb, np.float32)
    if w.ndim == 3:
        w = w.mean(axis=1)
        w = w / np.linalg.norm(w, axis=-1, keepdims=True)
    logits = np.asarray(image_emb, np.float32) @ w.T
    labels = np.asarray(labels)
    result = {"zeroshot/top1": topk_accuracy(logits, labels, 1)}
    if w.shape[0] > 5:
        result["zeroshot/top5"] = topk_accuracy(logits, labels, 5)
    return result, np.argmax(logits, axis=-1)


def zeroshot(encoder: TowerEncoder, tokenizer, data: dict, class_names: Sequence[str],
             templates: Sequence[str], progress: bool = False):
    """Zero-shot classification of data['image'] (preprocessed) against class_names x templates.
    Returns (metrics, predictions)."""
    require_fields(data, ("image", "label"), "zero-shot")
    w = zeroshot_weights(encoder, tokenizer, class_names, templates)
    image_emb = embed(encoder, "encode_image", data["image"], "zero-shot images", progress)
    return zeroshot_metrics(image_emb, w, data["label"])


def audio_zeroshot(encoder: TowerEncoder, tokenizer, clips: dict, class_names, templates,
                   primary: bool = False) -> dict[str, float]:
    """clips {'waveform' [N, T], 'length' [N], 'label' [N]} -> {'zeroshot/audio/top1', 'zeroshot/audio/top5'}
    (+ 'zeroshot/top1', 'zeroshot/top5' when `primary`: audio is the config's main modality)."""
    for key in ('waveform', 'length', 'label'):
        if key not in clips:
            raise ValueError(f'audio zero-shot needs a {key!r} field; got {sorted(clips)}')
    w = zeroshot_weights(encoder, tokenizer, class_names, templates)
    emb = encoder.encode_audio(clips['waveform'], clips['length'])
    metrics, _ = zeroshot_metrics(emb, w, clips['label'])
    result = {k.replace('zeroshot/', 'zeroshot/audio/'): v for k, v in metrics.items()}
    if primary:
        result.update(metrics)
    return result


def zeroshot_by_tower(encoder: TowerEncoder, tokenizer, data: dict, towers,
                      progress: bool = False) -> tuple[dict[str, float], np.ndarray | None]:
    """Zero-shot of every tower that has a test set: images (`data['test']`) with an image tower, held-out clips
    (`data['clips']`) with an audio tower, both against `data`'s class prompts (`mmjax.eval.suite.load_eval_data`).
    The image figures are 'zeroshot/top1|top5' (also under 'zeroshot/image/' when there is an audio tower too);
    the audio figures 'zeroshot/audio/top1|top5' (also as 'zeroshot/top1|top5' without an image tower).
    Returns (metrics, image predictions [N] or None). What `mmjax train` logs and `mmjax eval` writes."""
    results: dict[str, float] = {}
    preds = None
    if 'image' in towers:
        zeroshot_images, preds = zeroshot(encoder, tokenizer, data['test'], data['class_names'],
                                              data['templates'], progress)
        results.update(zeroshot_images)
        if 'audio' in towers:
            results.update({k.replace('zeroshot/', 'zeroshot/image/'): v for k, v in zeroshot_images.items()})
    if 'audio' in towers:
        if 'clips' not in data:
            raise ValueError("audio zero-shot needs the held-out clips (data['clips'], from load_eval_data)")
        results.update(audio_zeroshot(encoder, tokenizer, data['clips'], data['class_names'], data['templates'],
                                      primary='image' not in towers))
    return results, preds
