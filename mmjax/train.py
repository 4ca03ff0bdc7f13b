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
import optax

from mmjax import config as config_lib
from mmjax import losses
from mmjax import sharding as shd
from mmjax.checkpoint import Checkpointer
from mmjax.data import pipeline
from mmjax.data.tokenizers import get_tokenizer
from mmjax.evaluate import TowerEncoder, zeroshot_eval
from mmjax.metrics import MetricsWriter, Progress
from mmjax.state import StateFactory, TrainState

# Block on a step's result at least this often: bounds the work queued ahead of the host (and the
# collectives in flight, which deadlock multi-process CPU runs past ~30).
MAX_STEPS_IN_FLIGHT = 8
MODEL_INPUTS = ("image", "text")


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, schedule, loss_name: str):
    """A pure step: (state, global batch) -> (new state, metrics dict of scalars)."""

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        def loss_fn(params):
            outputs = model.apply({"params": params}, batch, train=True)
            loss, metrics = losses.contrastive_loss(outputs, loss_name)
            return loss, (metrics, outputs["logit_scale"])

        (loss, (metrics, scale)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads), logit_scale=scale,
                       lr=schedule(state.step))
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def config_to_json(config) -> dict:
    return json.loads(config.to_json_best_effort())


def train(config, workdir: str, devices: Sequence[jax.Device] | None = None,
          stop_at_step: int | None = None, verbose: bool = True) -> dict[str, Any]:
    """Trains `config` in `workdir` (resuming if it holds checkpoints). Returns the last metrics.

    stop_at_step: end early after this step, with a checkpoint written (for tests and preemption).
    """
    devices = list(jax.devices() if devices is None else devices)
    config_lib.validate(config, len(devices), jax.process_count())
    is_main = jax.process_index() == 0
    log = print if (verbose and is_main) else (lambda *a, **k: None)
    os.makedirs(workdir, exist_ok=True)

    mesh = shd.make_mesh(config.mesh, devices)
    factory = StateFactory(config, mesh)
    log(f"mmjax: mesh {dict(mesh.shape)} over {len(devices)} device(s), "
        f"{jax.process_count()} process(es); {factory.param_count() / 1e6:.2f}M parameters")

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep,
                        async_save=config.checkpoint.async_save)
    loader_iter = iter(pipeline.make_train_loader(config, jax.process_index(), jax.process_count()))
    latest = ckpt.latest_step()
    if latest is not None:
        log(f"mmjax: resuming from {ckpt.directory}/{latest}")
        state = ckpt.restore(latest, factory.abstract, loader_iter)
    else:
        state = factory.init(config.seed)
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(config_to_json(config), f, indent=2)

    step_fn = jax.jit(
        make_train_step(factory.model, factory.tx, factory.schedule, config.model.loss),
        in_shardings=(factory.shardings, shd.batch_sharding(mesh)),
        out_shardings=(factory.shardings, shd.replicated(mesh)),
        donate_argnums=0,
    )
    total = config.train.steps
    end = total if stop_at_step is None else min(stop_at_step, total)
    start = int(jax.device_get(state.step))
    writer = MetricsWriter(workdir, enabled=is_main)
    progress = Progress(total, config.train.batch_size, start, enabled=verbose and is_main)
    config_json = config_to_json(config)
    last: dict[str, Any] = {}
    wait_time = 0.0
    with jax.set_mesh(mesh), nn.logical_axis_rules(factory.rules):
        for step in range(start + 1, end + 1):
            t0 = time.perf_counter()
            host_batch = next(loader_iter)
            wait_time += time.perf_counter() - t0
            batch = shd.global_batch({k: host_batch[k] for k in MODEL_INPUTS}, mesh)
            state, metrics = step_fn(state, batch)
            if step == start + 1:
                jax.block_until_ready(metrics)
                progress.mark_compiled(step)
                wait_time = 0.0
            if step % config.train.log_every == 0 or step == end:
                metrics = jax.device_get(metrics)
                sps = progress.samples_per_second(step)
                extra = {"samples_per_second": sps} if sps == sps else {}
                last = writer.write(step, {**metrics, **extra})
                progress.log(step, metrics)
            elif step % MAX_STEPS_IN_FLIGHT == 0:
                jax.block_until_ready(metrics)
            if step % config.checkpoint.every_steps == 0 or step == end:
                ckpt.save(step, state, loader_iter, config_json)
    ckpt.wait()
    if end == total and config.eval.zeroshot:
        results = run_zeroshot(config, factory, state.params, mesh)
        last.update(writer.write(end, results))
        log("mmjax: " + ", ".join(f"{k} = {v:.4f}" for k, v in results.items()))
    ckpt.close()
    writer.close()
    return last


def run_zeroshot(config, factory: StateFactory, params, mesh) -> dict[str, float]:
    """Zero-shot classification of the held-out split against the dataset's class prompts."""
    evaluation = pipeline.load_eval_split(config, "test")
    class_names, templates = pipeline.zeroshot_prompts(config)
    encoder = TowerEncoder(factory.model, params, mesh, factory.rules, config.eval.batch_size)
    tokenizer = get_tokenizer(config.model.text)
    return zeroshot_eval(encoder, tokenizer, evaluation["image"], evaluation["label"],
                         class_names, templates)
