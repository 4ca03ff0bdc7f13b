"""End-of-training evaluation of the fusion tasks on held-out image-caption pairs (mmjax/data/pairs.py).

- classification: accuracy of the FusionClassifier's match / no-match prediction -> 'classify/accuracy'.
- itm_mlm: ITM accuracy (match logit > 0 on matching pairs, < 0 on the others) -> 'itm/accuracy'; MLM accuracy
  on the matching captions masked with a fixed key -> 'mlm/accuracy' (over 'mlm/count' masked tokens).
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mmjax import objectives
from mmjax import sharding as shd
from mmjax.data import pairs


def batched_apply(fn: Callable, params, inputs: dict[str, np.ndarray], mesh: Mesh, rules,
                  batch_size: int) -> dict[str, np.ndarray]:
    """Runs jitted `fn(params, batch) -> dict of [b] arrays` over `inputs` (dict of [N, ...]) in batches sharded
    over the batch axes (the last batch padded by repetition). Returns the outputs concatenated, [N] each."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    batch_size = max(shards, (batch_size // shards) * shards)
    n = len(next(iter(inputs.values())))
    sharding = shd.batch_sharding(mesh)
    out: dict[str, list[np.ndarray]] = {}
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        for start in range(0, n, batch_size):
            pad = max(0, start + batch_size - n)
            batch = {}
            for k, v in inputs.items():
                chunk = v[start:start + batch_size]
                if pad:
                    chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
                batch[k] = jax.make_array_from_callback(chunk.shape, sharding, lambda idx, c=chunk: c[idx])
            for k, v in jax.device_get(fn(params, batch)).items():
                out.setdefault(k, []).append(np.asarray(v)[:batch_size - pad])
    return {k: np.concatenate(v) for k, v in out.items()}


def classification_eval(config, model: nn.Module, params, mesh: Mesh, rules) -> dict[str, float]:
    """Held-out pair accuracy of a FusionClassifier: {'classify/accuracy', 'classify/num_examples'}."""
    data = pairs.load_eval_pairs(config)

    @jax.jit
    def predict(p, batch):
        logits = model.apply({"params": p}, {"image": batch["image"], "text": batch["text"]})
        return {"prediction": jnp.argmax(logits, axis=-1)}

    out = batched_apply(predict, params, {k: data[k] for k in ("image", "text")}, mesh, rules,
                        config.eval.batch_size)
    return {"classify/accuracy": float(np.mean(out["prediction"] == data["label"])),
            "classify/num_examples": float(len(data["label"]))}


def itm_mlm_eval(config, model: nn.Module, params, mesh: Mesh, rules) -> dict[str, float]:
    """Held-out ITM and MLM accuracy of a ContrastiveItmMlmModel: {'itm/accuracy', 'mlm/accuracy', 'mlm/count'}."""
    data = pairs.load_eval_pairs(config)
    o, vocab = config.objectives, int(config.model.text.vocab_size)
    masked, targets, weights = jax.device_get(objectives.mask_tokens(
        data["text"], jax.random.key(pairs.EVAL_SEED), float(o.mask_prob), int(o.mask_id), vocab))
    weights = weights * data["label"][:, None]  # MLM is scored on matching captions only

    @jax.jit
    def score(p, batch):
        out = model.apply({"params": p}, {"image": batch["image"], "text": batch["text"],
                                          "mlm_text": batch["mlm_text"]}, method="pair_logits")
        hit = (jnp.argmax(out["mlm_logits"], axis=-1) == batch["mlm_targets"]).astype(jnp.float32)
        return {"itm_logits": out["itm_logits"], "mlm_correct": jnp.sum(hit * batch["mlm_weights"], axis=1)}

    inputs = {"image": data["image"], "text": data["text"], "mlm_text": np.asarray(masked),
              "mlm_targets": np.asarray(targets), "mlm_weights": np.asarray(weights, np.float32)}
    out = batched_apply(score, params, inputs, mesh, rules, config.eval.batch_size)
    count = float(np.sum(weights))
    return {"itm/accuracy": float(np.mean((out["itm_logits"] > 0) == (data["label"] == 1))),
            "mlm/accuracy": float(np.sum(out["mlm_correct"]) / max(count, 1.0)),
            "mlm/count": count}
