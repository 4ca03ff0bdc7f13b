"""Fine-tuning modes (mmjax/training/finetune.py): each trains exactly its parameters, adapters and LoRA start as the
identity, frozen parameters hold no optimizer state, prompts keep text pooling on the right token,
init_from reports what it loaded / initialised / ignored, and configs that freeze everything are refused."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_config import tiny

from mmjax import config as config_lib
from mmjax.models.encoders import last_nonpad_index
from mmjax.runtime import sharding as shd
from mmjax.tasks import make_objective
from mmjax.tasks.contrastive import GradCacheObjective, make_loss_fn
from mmjax.training import finetune, init_from, preflight
from mmjax.training.checkpoint import Checkpointer
from mmjax.training.loop import config_to_json
from mmjax.training.optim import param_path
from mmjax.training.state import StateFactory
from mmjax.training.step import make_train_step


def _config(mode="none", sharded=False, **finetune_kw):
    """The tiny config in `mode`; on 1 device (fast compiles) or, `sharded`, on a data=4 x fsdp=2 mesh."""
    c = tiny()
    c.unlock()
    c.finetune.mode = mode
    c.finetune.adapter_dim = 4
    c.finetune.prompt_len = 3
    c.finetune.update(finetune_kw)
    c.mesh.update(data=4, fsdp=2, tensor=1) if sharded else c.mesh.update(data=1, fsdp=1, tensor=1)
    c.optim.warmup_steps = 0
    c.optim.decay = "constant"
    c.lock()
    return c


def _batch(config, seed=0):
    rng = np.random.default_rng(seed)
    b, img, txt = config.train.batch_size, config.model.image, config.model.text
    images = rng.normal(size=(b, img.image_size, img.image_size, img.channels)).astype(np.float32)
    lengths = rng.integers(3, txt.max_len - 2, size=b)
    tokens = np.zeros((b, txt.max_len), np.int32)
    for i, n in enumerate(lengths):
        tokens[i, 0], tokens[i, 1:n - 1], tokens[i, n - 1] = 1, rng.integers(3, 259, n - 2), 2
    return {"image": images, "text": tokens}


def _factory(config):
    devices = jax.devices()[:config.mesh.data * config.mesh.fsdp]
    mesh = shd.make_mesh(config.mesh, devices)
    return StateFactory(config, mesh), mesh


def _flat(tree):
    return {param_path(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


EXPECTED = {  # mode -> predicate on a parameter path: should it train?
    "none": lambda n: True,
    "full": lambda n: True,
    "linear_probe": lambda n: n in ("image/head/kernel", "text/head/kernel", "logit_scale"),
    "adapter": lambda n: "/adapter_attn/" in n or "/adapter_mlp/" in n,
    "prompt": lambda n: n.endswith("/prompts"),
    "lora": lambda n: n.endswith("/lora_a") or n.endswith("/lora_b"),
    "locked_image": lambda n: not n.startswith("image/"),
}


@pytest.mark.parametrize("mode", sorted(EXPECTED))
def test_mode_updates_exactly_its_parameters(mode):
    config = _config(mode)
    factory, mesh = _factory(config)
    state = factory.init(0)
    before = _flat(state.params)
    step = jax.jit(make_train_step(factory.model, factory.tx, factory.schedule, make_objective(config, mesh),
                                   trainable=factory.trainable))
    batch = shd.global_batch(_batch(config), mesh)
    with jax.set_mesh(mesh):
        for _ in range(2):  # zero-initialised factors (adapter 'up', LoRA B) let the others move on step 2
            state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    after = _flat(state.params)
    changed = {n for n in before if not np.array_equal(before[n], after[n])}
    expected = {n for n in before if EXPECTED[mode](n)}
    assert expected, f"mode {mode!r} has no parameters to train"
    assert changed == expected, (sorted(changed - expected), sorted(expected - changed))
    trainable, total = finetune.count_trainable(config, state.params)
    assert trainable == sum(before[n].size for n in expected)
    assert total == sum(v.size for v in before.values())


def _step(factory, config, mesh, trainable, micro_batches=1):
    objective = make_objective(config, mesh)
    if micro_batches > 1:
        objective = GradCacheObjective(make_loss_fn(config.model, mesh), micro_batches)
    return jax.jit(make_train_step(factory.model, factory.tx, factory.schedule, objective, trainable=trainable))


@pytest.mark.parametrize("mode,micro_batches", [("lora", 1), ("locked_image", 1), ("locked_image", 2)])
def test_frozen_gradients_skipped_same_update(mode, micro_batches):
    """With the trainable mask the step never differentiates frozen parameters, yet updates the trainable ones
    exactly as the step that computes every gradient does (clipping active), and logs the trainable norm."""
    config = _config(mode)
    config.unlock()
    config.optim.clip_norm = 1e-3  # every step clips: the clipping norm must be the trainable gradients' norm
    config.lock()
    factory, mesh = _factory(config)
    state = factory.init(0)
    batch = shd.global_batch(_batch(config), mesh)
    with jax.set_mesh(mesh):
        new_masked, m_masked = _step(factory, config, mesh, factory.trainable, micro_batches)(state, batch)
        new_all, m_all = _step(factory, config, mesh, None, micro_batches)(factory.init(0), batch)
        objective = make_objective(config, mesh)
        grads = jax.jit(jax.grad(lambda p: objective(factory.model, p, batch, state.step)[0]))(state.params)
    for path, got in _flat(new_masked.params).items():
        np.testing.assert_allclose(got, _flat(new_all.params)[path], rtol=1e-5, atol=1e-7, err_msg=path)
    trainable = jax.tree.leaves(factory.trainable)
    norm = np.sqrt(sum(float(jnp.sum(g ** 2)) for g, t in zip(jax.tree.leaves(grads), trainable) if t))
    np.testing.assert_allclose(float(m_masked["grad_norm"]), norm, rtol=1e-5)
    assert float(m_all["grad_norm"]) > 1.01 * norm  # the old metric counted the frozen gradients too


def test_frozen_towers_cost_no_backward():
    """XLA's FLOP count of the compiled step: a linear probe costs about a forward pass, and every mode that
    freezes weights drops their weight-gradient matmuls (measured on this tiny config: linear probe 0.34x,
    locked image tower 0.81x, LoRA 0.63x, adapters 0.53x, prompts 0.73x of differentiating every parameter)."""
    limits = {"linear_probe": 0.5, "locked_image": 0.9, "lora": 0.8, "adapter": 0.8, "prompt": 0.9}
    ratios = {}
    for mode in limits:
        config = _config(mode)
        factory, mesh = _factory(config)
        state = factory.init(0)
        batch = shd.global_batch(_batch(config), mesh)
        with jax.set_mesh(mesh):
            flops = [_step(factory, config, mesh, trainable).lower(state, batch).compile().cost_analysis()["flops"]
                     for trainable in (factory.trainable, None)]
        ratios[mode] = flops[0] / flops[1]
    assert all(ratios[mode] < limit for mode, limit in limits.items()), ratios


@pytest.mark.parametrize("mode", ["linear_probe", "lora"])
def test_frozen_parameters_hold_no_optimizer_state(mode):
    config = _config(mode)
    factory, _ = _factory(config)
    trainable, total = finetune.count_trainable(config, factory.abstract.params)
    opt_values = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(factory.abstract.opt_state))
    # Adam's two moments for the trainable values, plus a few scalar counters; nothing for the frozen ones.
    assert 2 * trainable <= opt_values <= 2 * trainable + 8
    assert opt_values < total


def _towers_out(factory, params, batch):
    out = factory.model.apply({"params": params}, batch, method=factory.model.tower_outputs)
    return {k: {f: np.asarray(v) for f, v in o.items()} for k, o in out.items()}


@pytest.mark.parametrize("mode,extra", [("adapter", {}), ("lora", {"lora_targets": ".*"})])
def test_adapter_and_lora_are_the_identity_at_init(mode, extra):
    base_cfg, cfg = _config("none"), _config(mode, **extra)
    base, _ = _factory(base_cfg)
    tuned, _ = _factory(cfg)
    base_params = base.init(0).params
    params, report = init_from.merge_params(tuned.init(1).params, base_params)
    assert report["ignored"] == [] and len(report["initialised"]) > 0
    new = {n: v for n, v in _flat(params).items() if n in report["initialised"]}
    # LoRA's A (and the adapters' down projection) are random: identity comes from the zero factor alone.
    assert any(np.abs(v).max() > 0 for v in new.values())
    batch = {k: jnp.asarray(v) for k, v in _batch(base_cfg).items()}
    want, got = _towers_out(base, base_params, batch), _towers_out(tuned, params, batch)
    for tower in ("image", "text"):
        np.testing.assert_allclose(got[tower]["embedding"], want[tower]["embedding"], atol=1e-6, rtol=0)
        np.testing.assert_allclose(got[tower]["tokens"], want[tower]["tokens"], atol=1e-5, rtol=0)


def test_prompts_keep_text_pooling_on_the_eot_token():
    cfg = _config("prompt")
    factory, _ = _factory(cfg)
    params = factory.init(0).params
    batch = {k: jnp.asarray(v) for k, v in _batch(cfg).items()}
    out = _towers_out(factory, params, batch)
    b, length = batch["text"].shape
    assert out["text"]["tokens"].shape == (b, length, cfg.model.text.width)  # prompts dropped from the tokens
    assert out["image"]["tokens"].shape[1] == (cfg.model.image.image_size // cfg.model.image.patch_size) ** 2 + 1
    eot = np.asarray(last_nonpad_index(batch["text"]))
    np.testing.assert_array_equal(out["text"]["pooled"], out["text"]["tokens"][np.arange(b), eot])
    assert np.all(np.asarray(batch["text"])[np.arange(b), eot] == 2)
    # The prompts matter: the same text with other prompt values gives other features.
    shifted = jax.tree_util.tree_map_with_path(
        lambda p, v: v + 1.0 if param_path(p).endswith("/prompts") else v, params)
    assert not np.allclose(_towers_out(factory, shifted, batch)["text"]["pooled"], out["text"]["pooled"])


def _save_workdir(workdir, config, state):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config_to_json(config), f)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    ckpt.save(3, state, config_json=config_to_json(config))
    ckpt.close()


def test_init_from_reports_loaded_initialised_and_ignored(tmp_path):
    source_cfg = _config("none")  # saved from 1 device, restored onto 8
    source, _ = _factory(source_cfg)
    source_state = source.init(7)
    _save_workdir(str(tmp_path / "src"), source_cfg, source_state)

    cfg = _config("adapter", sharded=True)
    cfg.unlock()
    cfg.init_from.path = str(tmp_path / "src")
    cfg.init_from.include = r"(?!text/).*"  # everything but the text tower
    cfg.lock()
    preflight.check(cfg, len(jax.devices()))
    factory, _ = _factory(cfg)
    assert factory.shardings.params["image"]["encoder"]["transformer"]["block_0"]["adapter_mlp"]["down"][
        "kernel"].spec == jax.sharding.PartitionSpec("fsdp", None)  # ('embed', 'adapter')
    fresh = factory.init(0)
    lines = []
    state = init_from.start(cfg, factory, fresh, log=lines.append)
    text = "\n".join(lines)
    src, got, init = _flat(source_state.params), _flat(state.params), _flat(fresh.params)
    image_names = [n for n in src if n.startswith("image/")]
    for n in image_names + ["logit_scale"]:
        np.testing.assert_array_equal(got[n], src[n])
    for n in got:
        if n.startswith("text/") or "adapter_" in n:
            np.testing.assert_array_equal(got[n], init[n])
    n_loaded = len(image_names) + 1
    n_text = sum(n.startswith("text/") for n in src)
    n_adapter = sum("adapter_" in n for n in got)
    assert f"loaded {n_loaded} tensors" in text and "image/encoder (" in text and "logit_scale (1)" in text
    initialised = next(line for line in lines[-1].splitlines() if "newly initialised" in line)
    assert f"newly initialised {n_text + n_adapter} tensors" in initialised
    assert "image/encoder/" in initialised and "text/" in initialised
    ignored = next(line for line in lines[-1].splitlines() if "ignored" in line)
    assert f"ignored (in the checkpoint, not loaded) {n_text} tensors" in ignored and "text/" in ignored
    assert "image/" not in ignored
    assert "training" in text and "parameter values" in text  # the trainable fraction line


def test_init_from_shape_mismatch_names_the_parameter(tmp_path):
    source_cfg = _config("none")
    source, _ = _factory(source_cfg)
    _save_workdir(str(tmp_path / "src"), source_cfg, source.init(0))
    cfg = _config("none")
    cfg.unlock()
    cfg.model.embed_dim = 8
    cfg.init_from.path = str(tmp_path / "src" / "checkpoints")
    cfg.lock()
    factory, _ = _factory(cfg)
    with pytest.raises(ValueError, match=r"image/head/kernel.*\(32, 16\).*\(32, 8\)"):
        init_from.start(cfg, factory, factory.init(0), log=lambda *a: None)


def test_init_from_two_sources_with_renames_and_a_parameter_loaded_twice_is_an_error(tmp_path):
    """One source gives the text tower, a second gives its image tower under other names (swapped into 'text'
    and 'image' here by a rename); the same parameter from both sources is refused."""
    source_cfg = _config("none")
    source, _ = _factory(source_cfg)
    a, b = source.init(1), source.init(2)
    _save_workdir(str(tmp_path / "a"), source_cfg, a)
    _save_workdir(str(tmp_path / "b"), source_cfg, b)
    cfg = _config("none")
    cfg.unlock()
    cfg.init_from.path, cfg.init_from.include = str(tmp_path / "a"), "text/.*"
    cfg.init_from.more = (dict(path=str(tmp_path / "b"), include="image/.*",
                               rename=((r"image/encoder/(.*)", r"image/encoder/\1"),)),)
    cfg.lock()
    preflight.check(cfg, 1)
    factory, _ = _factory(cfg)
    fresh = factory.init(0)
    lines = []
    state = init_from.start(cfg, factory, fresh, log=lines.append)
    got, fa, fb, init = _flat(state.params), _flat(a.params), _flat(b.params), _flat(fresh.params)
    for n in got:
        want = fa[n] if n.startswith("text/") else fb[n] if n.startswith("image/") else init[n]
        np.testing.assert_array_equal(got[n], want, err_msg=n)
    assert sum("mmjax: init_from" in line for line in lines) == 2

    assert init_from.rename_params(["image/encoder/cls", "logit_scale"], ((r"image/encoder/(.*)", r"vision/\1"),)
                                   ) == {"image/encoder/cls": "vision/cls", "logit_scale": "logit_scale"}
    cfg.unlock()
    cfg.init_from.more = (dict(path=str(tmp_path / "b"), include="(text|image)/.*"),)
    cfg.lock()
    with pytest.raises(config_lib.ConfigError, match=r"parameter 'text/.*' is loaded from both .*/a/.* and .*/b/"):
        init_from.start(cfg, factory, fresh, log=lambda *a: None)
    cfg.unlock()
    cfg.init_from.more = (dict(path=str(tmp_path / "nowhere")), dict(pth="x"))
    cfg.init_from.rename = (("image/(", "x"),)
    cfg.lock()
    with pytest.raises(config_lib.ConfigError) as err:
        preflight.check(cfg, 1)
    for expected in ("init_from.more[0].path", "does not exist", "init_from.more[1]: each extra source",
                     "init_from.rename: invalid regex 'image/('"):
        assert expected in str(err.value)


def test_config_rejects_modes_that_freeze_everything_and_bad_keys(tmp_path):
    cfg = _config("linear_probe")
    cfg.unlock()
    cfg.optim.freeze_rules = (r".*/head/kernel", "logit_scale")
    cfg.lock()
    with pytest.raises(config_lib.ConfigError, match=r"finetune.mode='linear_probe'.*optim.freeze_rules.*"
                                                     r"freezes every parameter"):
        preflight.check(cfg, 1)
    cfg = _config("prompt")
    cfg.unlock()
    cfg.finetune.trainable = "text/head/kernel"  # exempted from the mode's freezing
    cfg.lock()
    preflight.check(cfg, 1)
    assert finetune.count_trainable(cfg, preflight.abstract_params(cfg))[0] == 2 * 3 * 32 + 32 * 16

    bad = _config("bitfit")
    bad.unlock()
    bad.init_from.path = str(tmp_path / "nowhere")
    bad.lock()
    with pytest.raises(config_lib.ConfigError) as e:
        preflight.check(bad, 1)
    assert "finetune.mode: unknown mode 'bitfit'" in str(e.value)
    assert "init_from.path" in str(e.value) and "does not exist" in str(e.value)
