"""End-of-training evaluation of the fusion tasks on held-out image-caption pairs (mmjax/data/pairs.py).

- classification: accuracy of the FusionClassifier's match / no-match prediction -> 'classify/accuracy'.
- itm_mlm: ITM accuracy (match logit > 0 on matching pairs, < 0 on the others) -> 'itm/accuracy'; MLM accuracy
  on the matching captions masked with a fixed key -> 'mlm/accuracy' (over 'mlm/count' masked tokens).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mmjax.data import pairs
from mmjax.eval.encoder import batched_apply
from mmjax.losses import fusion as objectives


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
