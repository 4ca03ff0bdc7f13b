"""The one training loop.

One batch, start to end:
  grain loader (this process's shard) -> `sharding.global_batch` (global jax.Array on the mesh)
  -> `train_step` (jit, sharded in/out, donated state: model -> loss -> optax update)
  -> `MetricsWriter` (JSONL + TensorBoard + progress line) and `Checkpointer` (Orbax, async).
A workdir with checkpoints is resumed from its latest one, data order included.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mmjax import accumulate
from mmjax import chunked_losses
from mmjax import finetune
from mmjax import objectives
from mmjax import optim
from mmjax import task_eval
from mmjax import config as config_lib
from mmjax import losses
from mmjax import sharding as shd
from mmjax import distributed
from mmjax.checkpoint import Checkpointer
from mmjax.data import pipeline
from mmjax.data.tokenizers import get_tokenizer
from mmjax import evaluators
from mmjax.evaluate import TowerEncoder
from mmjax.health import HealthMonitor, PreemptionGuard
from mmjax.metrics import MetricsWriter, Progress
from mmjax.speed import SpeedMeter
from mmjax.state import StateFactory, TrainState

# Block on a step's result at least this often: bounds the work queued ahead of the host (and the
# collectives in flight, which deadlock multi-process CPU runs past ~30).
MAX_STEPS_IN_FLIGHT = 8
# config.task -> the batch keys the step reads (a contrastive step reads its towers' inputs instead).
TASK_INPUTS = {"classification": ("image", "text", "label"), "itm_mlm": ("image", "text")}


def step_inputs(config) -> tuple[str, ...]:
    """The batch keys `config`'s train step reads: the contrastive towers' inputs ('image', 'text', 'audio'),
    or `TASK_INPUTS` of the other tasks. Batches keep only these (the loader may carry more)."""
    if config.task == "contrastive":
        return tuple(config.model.towers)
    return TASK_INPUTS[config.task]


def make_loss_fn(model_cfg, mesh):
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
            return chunked_losses.contrastive_loss_chunked(outputs, model_cfg.loss, mesh,
                                                           model_cfg.loss_chunk_size)
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
    step (`mmjax.accumulate`, GradCache): equal to the large-batch gradient, with the activation memory of one
    micro-batch. Called like any objective; `make_train_step` uses its `value_and_grad`."""

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
        return accumulate.accumulated_value_and_grad(model, params, batch, self._loss, self.micro_batches,
                                                     trainable=trainable)


def make_objective(config, mesh):
    """The loss of `config.task`: objective(model, params, global batch, step) -> (loss, metrics of scalars).

    contrastive: `make_loss_fn` on the ContrastiveModel outputs (metrics include 'logit_scale').
    classification: softmax CE of the FusionClassifier on batch['label'] ('loss', 'accuracy'), plus
        model.fusion.contrastive_weight * CLIP loss over the matching pairs
        (objectives.classification_contrastive_loss).
    itm_mlm: contrastive + itm_weight * ITM + mlm_weight * MLM; MLM masking and ITM negative sampling draw
        from jax.random.fold_in(key(config.seed), step), so a step's randomness does not depend on the mesh.
    """
    task = config.task
    if task == "classification":
        weight = float(config.model.fusion.get("contrastive_weight", 0.0) or 0.0)

        def classify(model, params, batch, step):
            del step
            inputs = {k: batch[k] for k in ("image", "text")}
            if weight > 0:  # CE + weight * contrastive on the matching pairs' tower embeddings
                outputs = model.apply({"params": params}, inputs, train=True, with_embeddings=True)
                return objectives.classification_contrastive_loss(outputs, batch["label"], weight)
            logits = model.apply({"params": params}, inputs, train=True)
            return objectives.classification_loss(logits, batch["label"])
        return classify
    if task == "itm_mlm":
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
    if int(config.train.micro_batches) > 1:
        return GradCacheObjective(make_loss_fn(config.model, mesh), config.train.micro_batches)
    return contrastive_objective(make_loss_fn(config.model, mesh))


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, schedule, objective,
                    trainable: Any = None):
    """A pure step: (state, global batch) -> (new state, metrics dict of scalars).

    objective: (model, params, batch, step) -> (loss, metrics), from `make_objective`. Metrics always hold
    'loss', 'grad_norm', 'lr', 'skipped' plus the task's own ('logit_scale' only when the model has one).
    trainable: `StateFactory.trainable`, a tree of bools like the params matching the freeze rules `tx` was built
    with. Frozen parameters then enter the loss under `stop_gradient`: the backward work only they need is not
    done (a locked tower's whole backward, every frozen kernel's weight gradient), 'grad_norm' is the norm of
    the trainable gradients, and `tx` clips by that norm instead of computing it again. None (every parameter
    trainable as far as the step knows): gradients of all parameters are computed and `tx` computes its own
    clipping norm.
    """

    value_and_grad = getattr(objective, "value_and_grad", None)
    tx = optax.with_extra_args_support(tx)
    norm_args = (lambda norm: {}) if trainable is None else (lambda norm: {"grad_norm": norm})

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        def loss_fn(params):
            return objective(model, optim.stop_frozen_gradients(params, trainable), batch, state.step)

        if value_and_grad is not None:  # e.g. GradCacheObjective: accumulated over micro-batches
            (loss, metrics), grads = value_and_grad(model, state.params, batch, state.step, trainable=trainable)
        else:
            (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grad_norm = optax.global_norm(grads)  # frozen parameters' gradients are zeros here
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(params, opt_state, grads):
            updates, opt_state = tx.update(grads, opt_state, params, **norm_args(grad_norm))
            return optax.apply_updates(params, updates), opt_state

        # A non-finite loss or gradient skips the update: params and optimizer state stay as they were. A
        # conditional rather than an elementwise select of new and old: the select kept both copies of params
        # and optimizer state alive (0.75 s against 0.44 s for ViT-B/32's update on the CPU).
        params, opt_state = jax.lax.cond(finite, update, lambda params, opt_state, grads: (params, opt_state),
                                         state.params, state.opt_state, grads)
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm, lr=schedule(state.step),
                       skipped=(~finite).astype(jnp.int32))
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def jit_train_step(config, factory: StateFactory, mesh):
    """`config`'s train step jitted as every run uses it (`train`, `mmjax compile`, `mmjax bench`): (state,
    global batch) -> (new state, metrics); the state sharded as `factory.shardings`, the batch over the batch
    axes, the metrics replicated, and the input state donated (its buffers become the new state's)."""
    return jax.jit(
        make_train_step(factory.model, factory.tx, factory.schedule, objective=make_objective(config, mesh),
                        trainable=factory.trainable),
        in_shardings=(factory.shardings, shd.batch_sharding(mesh)),
        out_shardings=(factory.shardings, shd.replicated(mesh)),
        donate_argnums=0,
    )


def config_to_json(config) -> dict:
    return json.loads(config.to_json_best_effort())


def train(config, workdir: str, devices: Sequence[jax.Device] | None = None,
          stop_at_step: int | None = None, verbose: bool = True) -> dict[str, Any]:
    """Trains `config` in `workdir` (resuming if it holds checkpoints). Returns the last metrics.

    stop_at_step: end early after this step, with a checkpoint written (for tests and time-boxed jobs).
    Raises ConfigError / CheckpointMismatchError before compiling, CheckpointWriteError when storage
    fails, NonFiniteError after `train.max_nonfinite_steps` non-finite steps in a row.
    """
    devices = list(jax.devices() if devices is None else devices)
    config_lib.validate(config, len(devices), jax.process_count())
    is_main = jax.process_index() == 0
    log = print if (verbose and is_main) else (lambda *a, **k: None)
    warn = print if is_main else (lambda *a, **k: None)  # problems are shown even when quiet
    os.makedirs(workdir, exist_ok=True)

    mesh = shd.make_mesh(config.mesh, devices)
    factory = StateFactory(config, mesh)
    log(f"mmjax: mesh {dict(mesh.shape)} over {len(devices)} device(s), "
        f"{jax.process_count()} process(es); {factory.param_count() / 1e6:.2f}M parameters")

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep,
                        async_save=config.checkpoint.async_save, log=warn)
    loader_iter = iter(pipeline.make_train_loader(config, jax.process_index(), jax.process_count()))
    latest, state = ckpt.restore_latest(factory.abstract, loader_iter, log=warn)
    if latest is not None:
        log(f"mmjax: resumed from {ckpt.directory}/{latest}")
    else:
        state = finetune.start(config, factory, factory.init(config.seed), log=log)  # init_from, report
    config_json = config_to_json(config)
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(config_json, f, indent=2)

    step_fn = jit_train_step(config, factory, mesh)
    total = config.train.steps
    end = total if stop_at_step is None else min(stop_at_step, total)
    start = int(jax.device_get(state.step))
    writer = MetricsWriter(workdir, enabled=is_main)
    progress = Progress(total, config.train.batch_size, start, enabled=verbose and is_main)
    speed_meter = SpeedMeter(config, devices)
    eval_every = int(config.eval.every_steps)
    eval_cache: dict[str, Any] = {}  # evaluation data, loaded once
    health = HealthMonitor(config.train.max_nonfinite_steps, config.train.spike_factor,
                           config.train.spike_window, config.train.batch_size, log=warn)
    last: dict[str, Any] = {}
    pending: list[tuple[int, Any]] = []  # (step, device metrics) not yet read on the host
    wait_time, timing_start = 0.0, None  # input_wait_fraction = wait_time / wall time since compiling
    step = start
    inputs = step_inputs(config)  # absent ones unpaired ('audio': {'waveform', 'length'})
    try:
        with PreemptionGuard(log=warn) as guard, jax.set_mesh(mesh), \
                nn.logical_axis_rules(factory.rules):
            for step in range(start + 1, end + 1):
                t0 = time.perf_counter()
                host_batch = next(loader_iter)
                t1 = time.perf_counter()
                # Steps run asynchronously: waiting for input costs time only if the previous step has
                # finished by the time the batch arrives (then the devices sat idle, at most t1 - t0).
                devices_idle = step > start + 1 and state.step.is_ready()
                batch = shd.global_batch({k: host_batch[k] for k in inputs if k in host_batch}, mesh)
                state, metrics = step_fn(state, batch)
                pending.append((step, metrics))
                if step == start + 1:
                    jax.block_until_ready(metrics)
                    progress.mark_compiled(step)
                    timing_start = time.perf_counter()
                elif devices_idle:
                    wait_time += t1 - t0
                is_log = step % config.train.log_every == 0 or step == end
                is_save = step % config.checkpoint.every_steps == 0 or step == end
                # Read metrics back (a sync point) at logs, saves, and at least every few steps.
                if is_log or is_save or len(pending) >= MAX_STEPS_IN_FLIGHT:
                    fetched = jax.device_get([m for _, m in pending])
                    for (s, _), m in zip(pending, fetched):
                        health.observe(s, m)
                    pending = []
                    if is_log:
                        sps = progress.samples_per_second(step)
                        extra = dict(health.counters(), **getattr(loader_iter, "stats", dict)())  # data/*
                        if sps == sps:
                            extra["samples_per_second"] = sps
                            extra.update(speed_meter.metrics(sps))
                        if timing_start is not None and step > start + 1:
                            extra["input_wait_fraction"] = wait_time / (time.perf_counter() - timing_start)
                        last = writer.write(step, {**fetched[-1], **extra})
                        progress.log(step, {**fetched[-1], **extra})
                    stop = (distributed.any_process(guard.requested)
                            if jax.process_count() > 1 else guard.requested)
                else:
                    stop = guard.requested if jax.process_count() == 1 else False
                if eval_every and step % eval_every == 0 and step != total and not stop:
                    t_eval = time.perf_counter()
                    results = evaluate(config, factory, state.params, mesh, eval_cache)
                    if results:
                        writer.write(step, results)
                        log(f"mmjax: eval at step {step}: "
                            + ", ".join(f"{k} = {v:.4f}" for k, v in results.items()))
                    progress.exclude(time.perf_counter() - t_eval)  # speed figures count training only
                    if timing_start is not None:
                        timing_start += time.perf_counter() - t_eval
                if is_save or stop:
                    ckpt.save(step, state, loader_iter, config_json, force=stop)
                if stop:
                    ckpt.wait()
                    warn(f"mmjax: preempted: stopped after step {step}/{total}; checkpoint "
                         f"{ckpt.directory}/{step} is durable. Run the same command to resume.")
                    ckpt.close()
                    return last
            ckpt.wait()
            if end == total:
                results = evaluate(config, factory, state.params, mesh, eval_cache)
                if results:
                    last.update(writer.write(end, results))
                    log("mmjax: " + ", ".join(f"{k} = {v:.4f}" for k, v in results.items()))
            ckpt.close()
    finally:
        writer.close()
    return last


def evaluate(config, factory: StateFactory, params, mesh, cache: dict | None = None) -> dict[str, float]:
    """The evaluation of `config.task`, at the end of training and every `config.eval.every_steps`.

    contrastive / itm_mlm: the evaluators enabled in config.eval (zeroshot, retrieval, linear_probe; see
    mmjax.evaluators); itm_mlm adds held-out 'itm/accuracy' and 'mlm/accuracy'; classification: held-out
    pair accuracy ('classify/accuracy'). `cache` keeps the evaluation data between calls.
    """
    results: dict[str, float] = {}
    unavailable = pipeline.zeroshot_unavailable(config)  # caption corpora have no labels / class prompts
    if config.task in ("contrastive", "itm_mlm"):  # validate() refused evaluators without a dataset
        results.update(contrastive_evals(config, factory, params, mesh, {} if cache is None else cache))
    if config.task == "classification":
        results.update(task_eval.classification_eval(config, factory.model, params, mesh, factory.rules))
    if config.task == "itm_mlm" and unavailable:
        print(f"mmjax: skipping the held-out ITM/MLM eval: {unavailable}")
    elif config.task == "itm_mlm":
        results.update(task_eval.itm_mlm_eval(config, factory.model, params, mesh, factory.rules))
    return results


def contrastive_evals(config, factory: StateFactory, params, mesh, cache: dict) -> dict[str, float]:
    """The evaluators enabled in config.eval on the dataset's held-out split (the same numbers as
    `mmjax eval`): zero-shot against the class prompts, retrieval, linear probe (fitted on the train split)."""
    chosen = [name for name in ("zeroshot", "retrieval", "linear_probe") if config.eval[name]]
    if not chosen:
        return {}
    if "data" not in cache:
        from mmjax.eval_cmd import load_eval_data

        cache["data"] = load_eval_data(config)
    data = cache["data"]
    encoder = TowerEncoder(factory.model, params, mesh, factory.rules, config.eval.batch_size)
    tokenizer = get_tokenizer(config.model.text)
    results: dict[str, float] = {}
    towers = config_lib.model_towers(config)
    if "zeroshot" in chosen:  # images and/or the held-out voices' clips against the prompts
        from mmjax import audio_eval

        results.update(audio_eval.zeroshot_by_tower(encoder, tokenizer, data, towers)[0])
    if "retrieval" in chosen:
        results.update(evaluators.retrieval(encoder, tokenizer, data["retrieval"])[0])
    if "linear_probe" in chosen:
        results.update(evaluators.linear_probe_eval(encoder, data["train"], data["test"])[0])
    return results