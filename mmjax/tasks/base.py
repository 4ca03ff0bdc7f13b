"""The Task interface: everything a task means, in one object the loop, `mmjax compile`, `mmjax bench` and
`mmjax eval` ask instead of branching on `config.task`.

A task says
  - `inputs(config)`: the batch keys its step reads (the loader may carry more; batches keep only these);
  - `examples`: what the training stream's examples are ('captions', or 'pairs': image-caption matching pairs);
  - `build_model(model_config)`: its Flax module, and `dummy_batch(config, n)`: input shapes to initialise it;
  - `step_batch(config, n)`: the shapes of a training batch as the loader delivers it (by default the same);
  - `objective(config, mesh)`: `(model, params, batch, step) -> (loss, metrics of scalars)`, optionally with its
    own `value_and_grad(model, params, batch, step, trainable=None)` (GradCache does);
  - `evaluate(config, model, params, mesh, rules, cache)`: its evaluators' metrics ({} if none);
  - `reference_evals(config, model, mesh, rules, data, batch_size)`: evaluators of a reference model its
    figures are compared against (task 'mdm': the linear probe at random init), which training's evaluation and
    `mmjax eval` both report ({} if none);
  - `config_problems(config)`: what it checks in the config on top of `mmjax.config.validate` (no I/O);
  - `sampler(config, model, n)`: for generative tasks, the program that generates (a `Sampler`, which
    `mmjax compile` compiles for a pod next to the train step); None for the others.

A new task is one module defining a `Task` subclass and one entry in `mmjax.tasks.TASKS`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from mmjax import config as config_lib
from mmjax.runtime.flops import train_flops_per_example

Metrics = dict[str, jax.Array]


class Sampler(NamedTuple):
    """What a generative task runs to generate: `fn(params, inputs) -> outputs` (traceable, not jitted; the
    KV-cached decoding of `mmjax.models.decoding` inside), its abstract `inputs` ({name: ShapeDtypeStruct
    [n, ...]}, every leading axis the batch) and `what` it draws, in words for reports."""

    fn: Callable[[Any, dict[str, jax.Array]], Any]
    inputs: dict[str, jax.ShapeDtypeStruct]
    what: str


class Objective(Protocol):
    """objective(model, params, batch, step) -> (loss, metrics); may define `value_and_grad` too."""

    def __call__(self, model: nn.Module, params: Any, batch: dict[str, jax.Array],
                 step: jax.Array) -> tuple[jax.Array, Metrics]: ...


def dummy_batch(config, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes of one batch of the towers' inputs: 'image' [B, H, W, C] float32, 'text' [B, L] int32, and with an
    audio tower 'audio' [B, T] float32 waveforms."""
    img, txt = config.model.image, config.model.text
    shapes = {
        "image": jax.ShapeDtypeStruct((batch_size, img.image_size, img.image_size, img.channels), jnp.float32),
        "text": jax.ShapeDtypeStruct((batch_size, txt.max_len), jnp.int32),
    }
    if "audio" in config_lib.model_towers(config):
        audio = config.model.audio
        shapes["audio"] = jax.ShapeDtypeStruct((batch_size, audio.max_frames * audio.hop - 1), jnp.float32)
    return shapes


def image_text_only_problems(config, task: str, finetune_mode: bool = True) -> list[str]:
    """The checks shared by tasks built on exactly the image and text towers, without fine-tuning modes, gradient
    accumulation or the chunked loss (`finetune_mode=False`: the caller checks finetune.mode itself)."""
    m, problems = config.model, []
    if tuple(m.towers) != ("image", "text") or tuple(tuple(p) for p in m.pairs) != (("image", "text", 1.0),):
        problems.append(f"model.towers / model.pairs: task {task!r} uses the image and text towers only; keep "
                        f"model.towers=('image', 'text') and model.pairs=(('image', 'text', 1.0),)")
    if m.loss_impl != "plain":
        problems.append(f"model.loss_impl={m.loss_impl!r} is only supported with task 'contrastive'; use 'plain' "
                        f"for task {task!r}")
    if config.train.micro_batches > 1:
        problems.append(f"train.micro_batches={config.train.micro_batches}: gradient accumulation is implemented "
                        f"for task 'contrastive' only; set it to 1 for task {task!r}")
    if finetune_mode and config.finetune.mode != "none":
        problems.append(f"finetune.mode={config.finetune.mode!r} is only supported with task 'contrastive' "
                        f"(got task {task!r}); use finetune.mode='none'")
    return problems


class Task(abc.ABC):
    """Base of the tasks: defaults for everything but the model and the objective, which each task defines."""

    name = ""
    examples = "captions"  # the training stream's examples (mmjax.data.pipeline.EXAMPLES)
    generates = ""  # what its sampler writes: "captions" (mmjax eval draws them), "text", "images"; "" none
    init_examples_per_shard = 1  # rows per batch shard of the init batch (ITM mines negatives: needs 2)

    def inputs(self, config) -> tuple[str, ...]:
        return ("image", "text")

    @abc.abstractmethod
    def build_model(self, model_config) -> nn.Module:
        """The task's model, built from `config.model` (with the fine-tuning mode's fields applied)."""

    def dummy_batch(self, config, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        return dummy_batch(config, batch_size)

    def step_batch(self, config, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes of one training batch of `batch_size` examples as the loader delivers it to the step (what
        `mmjax compile` and `mmjax bench` feed it): `dummy_batch` plus 'label' int32 [B] by default."""
        return dict(self.dummy_batch(config, batch_size), label=jax.ShapeDtypeStruct((batch_size,), jnp.int32))

    @abc.abstractmethod
    def objective(self, config, mesh: Mesh) -> Objective | Callable:
        """The loss the train step differentiates (see `Objective`)."""

    def evaluate(self, config, model: nn.Module, params, mesh: Mesh, rules, cache: dict) -> dict[str, float]:
        return {}

    def reference_evals(self, config, model: nn.Module, mesh: Mesh, rules, data: dict,
                        batch_size: int) -> dict[str, float]:
        """Metrics of a reference model (not the trained params) on the contrastive evaluators' data
        (`mmjax.eval.suite.load_eval_data`), reported next to the model's by training's evaluation and by
        `mmjax eval`; {} by default."""
        return {}

    def config_problems(self, config) -> list[str]:
        return []

    def flops_per_example(self, config) -> float:
        """Model FLOPs of one training example, for MFU (`mmjax.runtime.flops.train_flops_per_example`: the
        towers, full last blocks)."""
        return train_flops_per_example(config, pooled_only=False)

    def prepare(self, config, workdir: str, train_fn: Callable, log: Callable = print):
        """What `mmjax train` does before the run (I/O allowed): returns the config to train, e.g. with a
        tokenizer wired in that `train_fn(config, workdir)` trained first (task 'text_to_image'). The config as
        it is by default."""
        return config

    def sampler(self, config, model: nn.Module, batch_size: int) -> Sampler | None:
        """The generation program for `batch_size` rows (see `Sampler`); None: the task does not generate."""
        return None

    def inference_methods(self, config, model: nn.Module, params, mesh: Mesh, rules,
                          batch_size: int = 256) -> dict[str, Callable]:
        """Functions `mmjax.load(W)` adds to the loaded model, by name (e.g. 'encode_tokens', 'caption'),
        bound to its restored `params`; {} by default."""
        return {}
