"""Task 'itm_mlm': a contrastive model plus image-conditioned text layers with image-text matching (ITM) and
masked language modelling (MLM) heads (ALBEF-style).

Objective: contrastive + `objectives.itm_weight` × ITM + `objectives.mlm_weight` × MLM. MLM masking and ITM
negative sampling draw from `jax.random.fold_in(key(config.seed), step)`, so a step's randomness does not depend
on the mesh. Evaluation: the contrastive evaluators, plus held-out 'itm/accuracy' and 'mlm/accuracy'.
"""

from __future__ import annotations

import flax.linen as nn
import jax
from jax.sharding import Mesh

from mmjax.config import SPECIAL_TOKEN_IDS, validation
from mmjax.data import pipeline
from mmjax.eval.pairs import itm_mlm_eval
from mmjax.losses import fusion as objectives
from mmjax.models import build_itm_mlm_model
from mmjax.tasks.base import Task, image_text_only_problems
from mmjax.tasks.contrastive import contrastive_evals


def itm_mlm_objective(config):
    """objective(model, params, batch, step) of the ITM + MLM + contrastive loss."""
    o, m = config.objectives, config.model
    seed, loss_name, vocab = int(config.seed), str(m.loss), int(m.text.vocab_size)
    mask_prob, mask_id = float(o.mask_prob), int(o.mask_id)
    itm_weight, mlm_weight = float(o.itm_weight), float(o.mlm_weight)

    def itm_mlm(model, params, batch, step):
        r_mask, r_itm = jax.random.split(jax.random.fold_in(jax.random.key(seed), step))
        batch = objectives.add_mlm_inputs(batch, r_mask, mask_prob, mask_id, vocab)
        outputs = model.apply({"params": params}, batch, train=True, rngs={"itm": r_itm})
        loss, metrics = objectives.itm_mlm_loss(outputs, batch, loss_name, itm_weight, mlm_weight)
        return loss, dict(metrics, logit_scale=outputs["logit_scale"])

    return itm_mlm


class ItmMlmTask(Task):
    name = "itm_mlm"
    init_examples_per_shard = 2  # ITM mines its negatives inside the batch

    def build_model(self, model_config) -> nn.Module:
        return build_itm_mlm_model(model_config)

    def objective(self, config, mesh: Mesh):
        return itm_mlm_objective(config)

    def evaluate(self, config, model, params, mesh, rules, cache):
        results = contrastive_evals(config, model, params, mesh, rules, cache)
        unavailable = pipeline.zeroshot_unavailable(config)  # caption corpora have no labels / class prompts
        if unavailable:
            print(f"mmjax: skipping the held-out ITM/MLM eval: {unavailable}")
            return results
        results.update(itm_mlm_eval(config, model, params, mesh, rules))
        return results

    def config_problems(self, config) -> list[str]:
        return (image_text_only_problems(config, self.name) + _itm_mlm_problems(config)
                + validation.evaluator_problems(config))


def _itm_mlm_problems(config) -> list[str]:
    m, o, problems = config.model, config.objectives, []
    h = m.itm_mlm
    if h.num_layers < 1:
        problems.append(f"model.itm_mlm.num_layers must be positive, got {h.num_layers}")
    if h.num_heads < 1 or m.text.width % h.num_heads:
        problems.append(f"model.text.width={m.text.width} is not divisible by "
                        f"model.itm_mlm.num_heads={h.num_heads}")
    if h.pool not in ("eot", "cls"):
        problems.append(f"model.itm_mlm.pool: {h.pool!r}; choose 'eot' or 'cls'")
    if not 0 <= o.mask_id < m.text.vocab_size:
        problems.append(f"objectives.mask_id={o.mask_id} must be < model.text.vocab_size="
                        f"{m.text.vocab_size} (and >= 0)")
    elif o.mask_id in SPECIAL_TOKEN_IDS or (m.text.tokenizer == "bytes" and 3 <= o.mask_id < 259):
        problems.append(f"objectives.mask_id={o.mask_id} is a token the tokenizer emits; use an id in "
                        f"[259, model.text.vocab_size)")
    if not 0.0 < o.mask_prob <= 1.0:
        problems.append(f"objectives.mask_prob must be in (0, 1], got {o.mask_prob}")
    for key in ("itm_weight", "mlm_weight"):
        if o[key] < 0:
            problems.append(f"objectives.{key} must be >= 0, got {o[key]}")
    if config.train.batch_size < 2:
        problems.append("train.batch_size must be >= 2 for task 'itm_mlm' (ITM negatives come from the batch)")
    return problems

