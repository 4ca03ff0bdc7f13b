"""BEiT-3 as a fusion encoder: task 'classification' with model.fusion.backbone='multiway' builds a classifier on
the multiway stack's vision-language path under `MultiwayModel`'s parameter names (plus a new 'head'), so
`init_from` a task 'mdm' workdir loads the pretrained stack bit for bit; it trains through `mmjax train` (the CLI's
`main`), fully or head-only (optim.freeze_rules), and is scored on the held-out pairs ('classify/accuracy'); what
the backbone cannot do is refused before compiling, one line each (exit 2)."""

import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from test_mdm import CONFIG as MDM_CONFIG
from test_mdm import TINY_MDM, _records, _tiny_config, _train

from mmjax import cli, tasks
from mmjax import config as config_lib
from mmjax.errors import ConfigError
from mmjax.runtime import sharding as shd
from mmjax.tasks.classification import ClassificationTask
from mmjax.tasks.mdm import MdmTask
from mmjax.training import finetune, init_from
from mmjax.training.checkpoint import Checkpointer
from mmjax.training.optim import param_path
from mmjax.training.state import StateFactory

ROOT = os.path.dirname(os.path.dirname(__file__))
CLASSIFY = os.path.join(ROOT, "configs", "beit3_classify_digits.py")
HEAD_ONLY = r"(?!head/).*"
STEPS = 8
# The tiny pretraining of tests/test_mdm.py, shorter and without the dual encoder's evaluators.
PRETRAIN = [*TINY_MDM, "--config.image_tokenizer.steps=5", "--config.train.steps=6", "--config.optim.warmup_steps=2",
            "--config.checkpoint.every_steps=6", "--config.eval.zeroshot=False", "--config.eval.linear_probe=False"]
# The classifier on the same stack (TINY_MDM's model.mdm shapes; image and text shapes are the config's).
SHAPES = [a for a in TINY_MDM if a.startswith("--config.model.mdm.")]
FINETUNE = ["--quiet", *SHAPES, "--config.train.batch_size=32", f"--config.train.steps={STEPS}",
            "--config.train.log_every=4", "--config.optim.warmup_steps=2", "--config.optim.lr=0.003",
            f"--config.checkpoint.every_steps={STEPS}", "--config.checkpoint.async_save=False"]


def _flat(tree):
    return {param_path(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


def _classify_config(*overrides, workdir=""):
    config = config_lib.load_config_file(f"{CLASSIFY}:{workdir}" if workdir else CLASSIFY)
    return config_lib.apply_overrides(config, [a.removeprefix("--") for a in overrides if a.startswith("--config.")])


def _one_device(config):
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 1, 1
    return StateFactory(config, shd.make_mesh(config.mesh, jax.devices()[:1]))


def _latest_params(workdir):
    """{path: array} of the latest checkpoint of `workdir`, restored on one device."""
    factory = _one_device(config_lib.load_workdir_config(str(workdir)))
    ckpt = Checkpointer(os.path.join(str(workdir), "checkpoints"), async_save=False, read_only=True)
    try:
        return _flat(ckpt.restore_latest(factory.abstract)[1].params)
    finally:
        ckpt.close()


def _tiny_classifier_config():
    c = _tiny_config()  # tests/test_mdm.py's small multiway stack on 8x8 one-channel images
    c.task = "classification"
    c.model.fusion.update(backbone="multiway", hidden=16)
    return c


def test_the_classifier_is_the_mdm_stack_plus_a_head_with_logical_axes():
    config = _tiny_classifier_config()
    batch = {"image": jnp.zeros((3, 8, 8, 1)), "text": jnp.ones((3, 16), jnp.int32).at[:, 10:].set(0)}
    model = ClassificationTask().build_model(config.model)
    boxed = jax.eval_shape(model.init, jax.random.key(0), batch)["params"]
    pretrain = jax.eval_shape(MdmTask().build_model(config.model).init, jax.random.key(0), batch)["params"]
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
    ours = {param_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(boxed, is_leaf=is_box)[0]}
    theirs = {param_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(pretrain, is_leaf=is_box)[0]}
    for name, leaf in ours.items():  # every parameter carries a logical axis name per dimension
        assert isinstance(leaf, nn.LogicallyPartitioned) and len(leaf.names) == leaf.value.ndim, name
    head = {n for n in ours if n.startswith("head/")}
    assert head == {f"head/{p}" for p in ("ln/scale", "ln/bias", "fc_in/kernel", "fc_in/bias", "fc_out/kernel",
                                          "fc_out/bias")}
    assert ours["head/fc_in/kernel"].value.shape == (2 * 16, 16)  # image CLS and text BOS tokens, concatenated
    for name in set(ours) - head:  # the rest is the mdm model's, same name, shape and axes
        assert theirs[name].value.shape == ours[name].value.shape and theirs[name].names == ours[name].names, name
    stack = {n.split("/")[0] for n in set(ours) - head}
    assert stack == {"patch_embed", "image_cls", "image_pos", "text", "multiway", "ln_final"}, stack
    params = jax.jit(model.init)(jax.random.key(0), batch)["params"]
    logits = jax.jit(lambda p, b: model.apply({"params": p}, b, train=True))(params, batch)
    assert logits.shape == (3, 2) and logits.dtype == jnp.float32
    mask = finetune.trainable_mask(boxed, (HEAD_ONLY,))  # a head-only fine-tune trains the head only
    assert {n for n, m in _flat(mask).items() if m} == head


@pytest.mark.parametrize("override,expected", [
    ("--config.model.fusion.contrastive_weight=1.0", "model.fusion.contrastive_weight=1.0: the multiway backbone"),
    ("--config.finetune.mode=lora", "finetune.mode='lora': the multiway backbone supports full fine-tuning only"),
    ("--config.finetune.mode=linear_probe", "finetune.mode='linear_probe': the multiway backbone supports full"),
    ("--config.model.fusion.backbone=vit", "model.fusion.backbone='vit': choose one of ('towers', 'multiway')"),
    ("--config.model.fusion.mode=xattn", "model.fusion.mode='xattn': the multiway backbone fuses"),
    ("--config.model.mdm.num_heads=3", "model.mdm.width=64 is not divisible by model.mdm.num_heads=3"),
])
def test_what_the_multiway_backbone_cannot_do_is_one_line_before_compiling(override, expected, tmp_path, capsys):
    with pytest.raises(ConfigError) as e:
        tasks.validate(_classify_config(override), 1)
    assert len(e.value.problems) == 1 and e.value.problems[0].startswith(expected), e.value.problems
    assert "\n" not in e.value.problems[0]
    if override.startswith("--config.finetune"):
        assert "MultiwayBlock has no adapter / LoRA / prompt fields" in e.value.problems[0]
    capsys.readouterr()
    assert cli.main(["train", "--config", CLASSIFY, "--workdir", str(tmp_path / "w"), override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mmjax: error:") and expected in err[-1], err
    assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_the_towers_backbone_is_the_default_and_unchanged():
    config = config_lib.load_config_file(os.path.join(ROOT, "configs", "fusion_classifier.py"))
    assert config.model.fusion.backbone == "towers"
    assert type(ClassificationTask().build_model(config.model)).__name__ == "FusionClassifier"
    tasks.validate(_classify_config(), 1)  # the shipped multiway config validates


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """(workdir, data_dir) of a tiny task 'mdm' run (its tokenizer trained first by the same command)."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    workdir = tmp_path_factory.mktemp("mdm") / "beit3"
    assert _train(MDM_CONFIG, workdir, data_dir, *PRETRAIN) == 0
    return workdir, data_dir


@pytest.mark.slow
def test_init_from_an_mdm_workdir_loads_the_stack_bit_for_bit_and_fine_tunes(pretrained, tmp_path):
    workdir, data_dir = pretrained
    source = _latest_params(workdir)
    config = _classify_config(*FINETUNE, workdir=str(workdir))
    factory = _one_device(config)
    fresh = factory.init(int(config.seed))
    lines = []
    start = _flat(init_from.start(config, factory, fresh, log=lines.append).params)
    head = {n for n in start if n.startswith("head/")}
    assert head and len(start) > 3 * len(head)
    for name, value in start.items():
        if name in head:  # new: the fresh init, absent from the checkpoint
            assert name not in source
            np.testing.assert_array_equal(value, _flat(fresh.params)[name])
        else:  # the pretrained stack, bit for bit
            assert value.dtype == source[name].dtype
            np.testing.assert_array_equal(value, source[name], err_msg=name)
    report = "\n".join(lines)
    assert f"loaded {len(start) - len(head)} tensors" in report and "newly initialised 6 tensors" in report
    ignored = re.search(r"ignored \(in the checkpoint, not loaded\) (\d+) tensors: (.*)", report)
    assert int(ignored.group(1)) == len(set(source) - set(start)) and "mim_head" in ignored.group(2)

    full, frozen = tmp_path / "full", tmp_path / "head_only"
    args = [*FINETUNE, f"--config.data.data_dir={data_dir}"]
    assert cli.main(["train", "--config", f"{CLASSIFY}:{workdir}", "--workdir", str(full), *args]) == 0
    assert cli.main(["train", "--config", f"{CLASSIFY}:{workdir}", "--workdir", str(frozen), *args,
                     f"--config.optim.freeze_rules=('{HEAD_ONLY}',)"]) == 0
    for run in (full, frozen):
        records = _records(run)
        losses = [r["loss"] for r in records if "loss" in r]
        assert len(losses) == STEPS // 4 and all(math.isfinite(x) for x in losses), records
        final = records[-1]
        assert final["step"] == STEPS and 0.0 <= final["classify/accuracy"] <= 1.0, final
        assert final["classify/num_examples"] == 360
    trained, head_only = _latest_params(full), _latest_params(frozen)
    moved = [n for n in start if n not in head and not np.array_equal(trained[n], start[n])]
    assert len(moved) > 0.9 * (len(start) - len(head)), moved  # full fine-tuning trains the stack
    for name in start:
        if name in head:
            assert not np.array_equal(head_only[name], start[name]), name  # the head trains ...
        else:
            np.testing.assert_array_equal(head_only[name], source[name], err_msg=name)  # ... the stack does not
    # `mmjax eval` scores a classification workdir as training did (the task's evaluation, not the dual-encoder
    # evaluators it has no embeddings for) and writes it to W/eval/<step>.json.
    assert cli.main(["eval", "--config", f"{CLASSIFY}:{workdir}", "--workdir", str(full), "--no-plots", "--quiet",
                     f"--config.data.data_dir={data_dir}"]) == 0
    written = json.loads((full / "eval" / f"{STEPS}.json").read_text())
    assert written["classify/accuracy"] == _records(full)[-1]["classify/accuracy"], written
