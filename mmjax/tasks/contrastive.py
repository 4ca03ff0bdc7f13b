"""Task 'contrastive': CLIP / SigLIP dual (or N-tower) encoders trained with a contrastive loss per modality pair.

Objective: the plain loss, or the chunked ring loss over the batch axes (`model.loss_impl`), summed over
`model.pairs` present in the batch; with `train.micro_batches` > 1 its gradient is accumulated over micro-batches
inside the step (GradCache, equal to the large-batch step). Evaluation: the evaluators enabled in `config.eval`
(zero-shot for every tower, retrieval, linear probe) on the dataset's held-out split, as `mmjax eval` runs them.
"""

from __future__ import annotations

import flax.linen as nn
from jax.sharding import Mesh

from mmjax import config as config_lib
from mmjax.config import validation
from mmjax.data.tokenizers import get_tokenizer
from mmjax.eval import suite
from mmjax.eval.encoder import TowerEncoder
from mmjax.eval.linear_probe import linear_probe_eval
from mmjax.eval.retrieval import retrieval
from mmjax.eval.zeroshot import zeroshot_by_tower
from mmjax.losses import chunked as chunked_losses
from mmjax.losses import contrastive as losses
from mmjax.losses import gradcache
from mmjax.models import build_model
from mmjax.runtime.flops import train_flops_per_example
from mmjax.tasks.base import Task


def make_loss_fn(model_cfg, mesh: Mesh):
    """outputs -> (loss, metrics): the plain loss, or the chunked ring loss over the batch axes. With
    model.pairs other than the default image-text pair: the weighted sum over the pairs present in the batch
    (losses.multi_pair_contrastive_loss, per-pair 'loss/<a>_<b>')."""
    pairs = tuple((str(a), str(b), float(w)) for a, b, w in model_cfg.get("pairs", losses.DEFAULT_PAIRS))
    if pairs != losses.DEFAULT_PAIRS:
        if model_cfg.loss_impl == "chunked":
            def pair_loss(outputs, a, b):
                return chunked_losses.pairwise_contrastive_loss_chunked(outputs, a, b, model_cfg.loss, mesh,
                                                                         model_cfg.loss_chunk_size)
        else:
            pair_loss = None
        return lambda outputs: losses.multi_pair_contrastive_loss(outputs, pairs, model_cfg.loss, pair_loss)
    if model_cfg.loss_impl == "chunked":
        def loss(outputs):
            return chunked_losses.contrastive_loss_chunked(outputs, model_cfg.loss, mesh, model_cfg.loss_chunk_size)
        return loss
    return lambda outputs: losses.contrastive_loss(outputs, model_cfg.loss)


def contrastive_objective(contrastive_loss):
    """outputs -> (loss, metrics) as an objective(model, params, batch, step) -> (loss, metrics)."""

    def objective(model, params, batch, step):
        del step
        outputs = model.apply({"params": params}, batch, train=True)
        loss, metrics = contrastive_loss(outputs)
        return loss, dict(metrics, logit_scale=outputs["logit_scale"])

    return objective


class GradCacheObjective:
    """The contrastive objective with its gradient accumulated over `micro_batches` micro-batches inside the
    step (`mmjax.losses.gradcache`, GradCache): equal to the large-batch gradient, with the activation memory of
    one micro-batch. Called like any objective; the train step uses its `value_and_grad`."""

    def __init__(self, contrastive_loss, micro_batches: int):
        self.contrastive_loss = contrastive_loss
        self.micro_batches = int(micro_batches)

    def _loss(self, outputs):
        loss, metrics = self.contrastive_loss(outputs)
        return loss, dict(metrics, logit_scale=outputs["logit_scale"])

    def __call__(self, model, params, batch, step):
        del step
        return self._loss(model.apply({"params": params}, batch, train=True))

    def value_and_grad(self, model, params, batch, step, trainable=None):
        del step
        return gradcache.accumulated_value_and_grad(model, params, batch, self._loss, self.micro_batches,
                                                    trainable=trainable)


def contrastive_evals(config, model: nn.Module, params, mesh: Mesh, rules, cache: dict) -> dict[str, float]:
    """The evaluators enabled in config.eval on the dataset's held-out split (the same numbers as
    `mmjax eval`): zero-shot against the class prompts, retrieval, linear probe (fitted on the train split).
    `cache` keeps the evaluation data between calls."""
    chosen = [name for name in ("zeroshot", "retrieval", "linear_probe") if config.eval[name]]
    if not chosen:
        return {}
    if "data" not in cache:
        cache["data"] = suite.load_eval_data(config)
    data = cache["data"]
    encoder = TowerEncoder(model, params, mesh, rules, config.eval.batch_size)
    tokenizer = get_tokenizer(config.model.text)
    results: dict[str, float] = {}
    if "zeroshot" in chosen:  # images and/or the held-out voices' clips against the prompts
        results.update(zeroshot_by_tower(encoder, tokenizer, data, config_lib.model_towers(config))[0])
    if "retrieval" in chosen:
        results.update(retrieval(encoder, tokenizer, data["retrieval"])[0])
    if "linear_probe" in chosen:
        results.update(linear_probe_eval(encoder, data["train"], data["test"])[0])
    return results


class ContrastiveTask(Task):
    name = "contrastive"

    def inputs(self, config) -> tuple[str, ...]:
        return tuple(config.model.towers)  # 'audio' is {'waveform', 'length'}

    def build_model(self, model_config) -> nn.Module:
        return build_model(model_config)

    def objective(self, config, mesh: Mesh):
        if int(config.train.micro_batches) > 1:
            return GradCacheObjective(make_loss_fn(config.model, mesh), config.train.micro_batches)
        return contrastive_objective(make_loss_fn(config.model, mesh))

    def evaluate(self, config, model, params, mesh, rules, cache):
        return contrastive_evals(config, model, params, mesh, rules, cache)

    def config_problems(self, config) -> list[str]:
        return validation.pairs_problems(config) + validation.evaluator_problems(config)

    def flops_per_example(self, config) -> float:
        return train_flops_per_example(config, pooled_only=True)  # the loss reads only the pooled features
