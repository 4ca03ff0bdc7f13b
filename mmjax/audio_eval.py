"""Zero-shot classification of held-out spoken digits against the ten number prompts.

The audio tower embeds every clip of the held-out voices (`mmjax.data.speech_triples.eval_clips`); the text tower
embeds the digits' prompts (class embedding = mean of its prompt embeddings, re-normalised); a clip is classified
by its most similar class. Metrics: 'zeroshot/audio/top1' and 'zeroshot/audio/top5' (and, with `primary`, the
same values as 'zeroshot/top1' / 'zeroshot/top5').
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np

from mmjax import sharding as shd
from mmjax.evaluate import TowerEncoder, zeroshot_weights
from mmjax import evaluators
from mmjax.evaluators import zeroshot_metrics


def encode_audio(encoder: TowerEncoder, waveforms: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """waveforms float32 [N, T], lengths int [N] -> unit-norm float32 [N, D], in batch-sharded chunks of
    `encoder.batch_size` (the last one padded by repeating its last clip) with `encoder`'s model and params."""
    if 'audio' not in encoder._fns:
        def apply(params, x):
            return encoder.model.apply({'params': params}, 'audio', x, method='encode')
        encoder._fns['audio'] = jax.jit(apply, out_shardings=shd.replicated(encoder.mesh))
    fn, bs, n = encoder._fns['audio'], encoder.batch_size, len(waveforms)
    sharding = shd.batch_sharding(encoder.mesh)
    out = []
    with jax.set_mesh(encoder.mesh), nn.logical_axis_rules(encoder.rules):
        for start in range(0, n, bs):
            chunk = {'waveform': waveforms[start:start + bs], 'length': lengths[start:start + bs]}
            pad = bs - len(chunk['length'])
            if pad:
                chunk = {k: np.concatenate([v, np.repeat(v[-1:], pad, axis=0)]) for k, v in chunk.items()}
            x = {k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx]) for k, v in chunk.items()}
            out.append(np.asarray(fn(encoder.params, x))[:bs - pad])
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 0), np.float32)


def audio_zeroshot(encoder: TowerEncoder, tokenizer, clips: dict, class_names, templates,
                   primary: bool = False) -> dict[str, float]:
    """clips {'waveform' [N, T], 'length' [N], 'label' [N]} -> {'zeroshot/audio/top1', 'zeroshot/audio/top5'}
    (+ 'zeroshot/top1', 'zeroshot/top5' when `primary`: audio is the config's main modality)."""
    for key in ('waveform', 'length', 'label'):
        if key not in clips:
            raise ValueError(f'audio zero-shot needs a {key!r} field; got {sorted(clips)}')
    w = zeroshot_weights(encoder, tokenizer, class_names, templates)
    emb = encode_audio(encoder, clips['waveform'], clips['length'])
    metrics, _ = zeroshot_metrics(emb, w, clips['label'])
    result = {k.replace('zeroshot/', 'zeroshot/audio/'): v for k, v in metrics.items()}
    if primary:
        result.update(metrics)
    return result


def zeroshot_by_tower(encoder: TowerEncoder, tokenizer, data: dict, towers,
                      progress: bool = False) -> tuple[dict[str, float], np.ndarray | None]:
    """Zero-shot of every tower that has a test set: images (`data['test']`) with an image tower, held-out clips
    (`data['clips']`) with an audio tower, both against `data`'s class prompts (`mmjax.eval_cmd.load_eval_data`).
    The image figures are 'zeroshot/top1|top5' (also under 'zeroshot/image/' when there is an audio tower too);
    the audio figures 'zeroshot/audio/top1|top5' (also as 'zeroshot/top1|top5' without an image tower).
    Returns (metrics, image predictions [N] or None). What `mmjax train` logs and `mmjax eval` writes."""
    results: dict[str, float] = {}
    preds = None
    if 'image' in towers:
        zeroshot, preds = evaluators.zeroshot(encoder, tokenizer, data['test'], data['class_names'],
                                              data['templates'], progress)
        results.update(zeroshot)
        if 'audio' in towers:
            results.update({k.replace('zeroshot/', 'zeroshot/image/'): v for k, v in zeroshot.items()})
    if 'audio' in towers:
        if 'clips' not in data:
            raise ValueError("audio zero-shot needs the held-out clips (data['clips'], from load_eval_data)")
        results.update(audio_zeroshot(encoder, tokenizer, data['clips'], data['class_names'], data['templates'],
                                      primary='image' not in towers))
    return results, preds
