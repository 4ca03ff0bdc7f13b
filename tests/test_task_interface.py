"""A new task is one class and one dict entry: a toy task defined here, registered in `mmjax.tasks.TASKS`, trains
and resumes through `mmjax train`'s code path (the CLI's `main`) without any other module knowing of it."""

import json
import os

import flax.linen as nn
import jax.numpy as jnp
import optax
import pytest

from mmjax import cli, tasks
from mmjax.tasks.base import Task

ROOT = os.path.dirname(os.path.dirname(__file__))
TINY = os.path.join(ROOT, "tests", "tiny_config.py")


class DigitLinear(nn.Module):
    """Logistic regression on the pixels: image [B, H, W, C] -> logits [B, 10]."""

    @nn.compact
    def __call__(self, batch, train: bool = False):
        x = batch["image"].reshape(batch["image"].shape[0], -1)
        return nn.Dense(10, name="head")(x)


class ToyDigitsTask(Task):
    """Classify the digits from their pixels; the step reads the image and the label only."""

    name = "toy_digits"

    def inputs(self, config):
        return ("image", "label")

    def build_model(self, model_config):
        return DigitLinear()

    def dummy_batch(self, config, batch_size):
        shapes = super().dummy_batch(config, batch_size)
        return {"image": shapes["image"]}

    def objective(self, config, mesh):
        def objective(model, params, batch, step):
            logits = model.apply({"params": params}, batch, train=True)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
            return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}
        return objective

    def evaluate(self, config, model, params, mesh, rules, cache):
        return {"toy/evaluated": 1.0}

    def config_problems(self, config):
        return [] if config.model.image.channels == 3 else ["model.image.channels: the toy task wants RGB"]


@pytest.fixture
def toy_task(monkeypatch):
    monkeypatch.setitem(tasks.TASKS, ToyDigitsTask.name, ToyDigitsTask)


def _train(workdir, data_dir, *extra):
    return cli.main(["train", "--config", TINY, "--workdir", str(workdir), "--quiet", "--config.task=toy_digits",
                     f"--config.data.data_dir={data_dir}", "--config.train.steps=6", "--config.optim.lr=0.003",
                     "--config.optim.warmup_steps=1", "--config.checkpoint.every_steps=3", *extra])


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_a_task_defined_outside_the_package_trains_evaluates_and_resumes(toy_task, tmp_path):
    data_dir, workdir = tmp_path / "tfds", tmp_path / "run"
    assert _train(workdir, data_dir, "--stop-at-step=3") == 0
    assert _train(workdir, data_dir) == 0  # resumes from step 3
    records = _records(workdir)
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, 7)), steps  # no step trained twice: the second run resumed
    assert all("accuracy" in r for r in records if "loss" in r)  # the task's own step metrics
    assert records[-1] == {"step": 6, "toy/evaluated": 1.0}  # its evaluator ran at the end
    first, last = records[0]["loss"], [r for r in records if "loss" in r][-1]["loss"]
    assert last < first  # it learns


def test_a_registered_task_checks_its_config_and_unknown_tasks_are_named(toy_task, tmp_path, capsys):
    assert _train(tmp_path / "a", tmp_path / "tfds", "--config.model.image.channels=1",
                  "--config.data.image_mean=(0.5,)", "--config.data.image_std=(0.5,)") == 2
    assert "the toy task wants RGB" in capsys.readouterr().err
    assert cli.main(["train", "--config", TINY, "--workdir", str(tmp_path / "b"), "--config.task=nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'nope'" in err and "toy_digits" in err and "contrastive" in err
