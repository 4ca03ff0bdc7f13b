"""Never continue from a non-finite state: the step skips an update whose new parameters or optimizer state
would not be finite, even when the loss and the gradient are, and leaves the state bit-identical."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_config import tiny

import mmjax
from mmjax import config as config_lib
from mmjax.commands.bench import synthetic_batch
from mmjax.losses.gradcache import stop_frozen_gradients
from mmjax.runtime import sharding as shd
from mmjax.tasks import make_objective
from mmjax.training import integrity, optim
from mmjax.training.checkpoint import Checkpointer, NonFiniteStateError
from mmjax.training.health import HealthMonitor, NonFiniteError
from mmjax.training.loop import train
from mmjax.training.metrics import read_metrics
from mmjax.training.optim import BOUND_LIMIT, measure_bound
from mmjax.training.state import StateFactory, TrainState, unknown_bound
from mmjax.training.step import all_finite, jit_train_step


@pytest.fixture(scope="module")
def setup():
    c = config_lib.apply_overrides(tiny(), ["config.mesh.data=1"])
    mesh = shd.make_mesh(c.mesh, jax.devices()[:1])
    factory = StateFactory(c, mesh)
    with jax.set_mesh(mesh):
        batch = shd.global_batch(synthetic_batch(c, c.train.batch_size), mesh)
    return c, mesh, factory, batch


def _unchecked_step(c, mesh, factory):
    """The step as it was before the new-state check: skipped only on a non-finite loss or gradient norm."""
    objective, tx, trainable = make_objective(c, mesh), optax.with_extra_args_support(factory.tx), factory.trainable

    def step(state, batch):
        def loss_fn(params):
            return objective(factory.model, stop_frozen_gradients(params, trainable), batch, state.step)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(params, opt_state, grads):
            updates, opt_state = tx.update(grads, opt_state, params, grad_norm=grad_norm)
            return optax.apply_updates(params, updates), opt_state

        params, opt_state = jax.lax.cond(finite, update, lambda p, o, g: (p, o), state.params, state.opt_state,
                                         grads)
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm, lr=factory.schedule(state.step),
                       skipped=(~finite).astype(jnp.int32))
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return jax.jit(step, in_shardings=(factory.shardings, shd.batch_sharding(mesh)),
                   out_shardings=(factory.shardings, shd.replicated(mesh)), donate_argnums=0)


def _poison(state, part: str, value: float) -> TrainState:
    """`state` with element [0, ...] of the first Adam `part` ('mu' or 'nu') kernel leaf set to `value`."""
    done = []

    def put(path, x):
        name = jax.tree_util.keystr(path)
        if done or f".{part}" not in name or "kernel" not in name:
            return x
        done.append(name)
        return x.at[(0,) * x.ndim].set(value)

    opt_state = jax.tree_util.tree_map_with_path(put, state.opt_state)
    assert done, f"no Adam {part} kernel leaf in the optimizer state"
    return state.replace(opt_state=opt_state)


def _host(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def _assert_bit_identical(a, b):
    for x, y in zip(_host(a), _host(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def test_all_finite_is_exact_and_does_not_overflow():
    big = {"a": jnp.full((1000,), 3e38, jnp.float32), "b": jnp.full((1000,), 3e38, jnp.float32),
           "c": jnp.ones((3, 4), jnp.bfloat16), "count": jnp.int32(7)}
    assert bool(all_finite(big))  # a plain sum of these would overflow to inf
    for bad in (math.inf, -math.inf, math.nan):
        for key in ("a", "c"):
            tree = dict(big, **{key: big[key].at[-1].set(bad)})
            assert not bool(jax.jit(all_finite)(tree)), (key, bad)


# mu = 3e38 and nu = -1 are finite but their update is not (inf and NaN parameters); mu = inf is a
# non-finite optimizer state that the loss and the gradient cannot reveal.
@pytest.mark.parametrize("part,value", [("mu", 3e38), ("nu", -1.0), ("mu", math.inf)])
def test_update_to_a_nonfinite_state_is_skipped_and_state_unchanged(setup, part, value):
    c, mesh, factory, batch = setup
    with jax.set_mesh(mesh):
        poisoned = _poison(factory.init(c.seed), part, value)
        before = jax.device_get(poisoned)
        # Without the check, the update goes through and the parameters become non-finite.
        unchecked, metrics = _unchecked_step(c, mesh, factory)(jax.device_put(before, factory.shardings), batch)
        assert int(metrics["skipped"]) == 0
        assert not all(np.isfinite(x).all() for x in _host(unchecked.params))
        new, metrics = jit_train_step(c, factory, mesh)(poisoned, batch)
    metrics = jax.device_get(metrics)
    assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])
    assert int(metrics["skipped"]) == 1
    assert int(new.step) == int(before.step) + 1
    _assert_bit_identical(new.params, before.params)
    _assert_bit_identical(new.opt_state, before.opt_state)


def test_a_normal_step_is_bit_identical_to_the_unchecked_step(setup):
    c, mesh, factory, batch = setup
    with jax.set_mesh(mesh):
        checked, unchecked = factory.init(c.seed), factory.init(c.seed)
        step, old = jit_train_step(c, factory, mesh), _unchecked_step(c, mesh, factory)
        for _ in range(3):
            checked, m_checked = step(checked, batch)
            unchecked, m_unchecked = old(unchecked, batch)
            m_checked, m_unchecked = jax.device_get((m_checked, m_unchecked))
            assert int(m_checked["skipped"]) == 0
            assert {k: np.asarray(v).tobytes() for k, v in m_checked.items()} == \
                {k: np.asarray(v).tobytes() for k, v in m_unchecked.items()}
    _assert_bit_identical(checked.saved(), unchecked.saved())


def test_the_monitor_names_a_state_skip_and_stops_after_k_in_a_row():
    lines = []
    monitor = HealthMonitor(max_nonfinite=2, spike_factor=0, window=10, batch_size=16, log=lines.append)
    monitor.observe(1, {"loss": 2.0, "grad_norm": 1.0, "skipped": 1})
    assert "would have made the parameters or optimizer state non-finite" in lines[-1]
    monitor.observe(2, {"loss": 2.0, "grad_norm": 1.0, "skipped": 0})
    monitor.observe(3, {"loss": math.nan, "grad_norm": 1.0, "skipped": 1})
    assert "non-finite loss (nan)" in lines[-1]
    with pytest.raises(NonFiniteError, match="2 consecutive steps .up to step 4.*updated state"):
        monitor.observe(4, {"loss": 2.0, "grad_norm": 1.0, "skipped": 1})


def test_training_from_a_nan_producing_optimizer_state_stops_and_checkpoints_only_finite_state(
        tmp_path, monkeypatch, capsys):
    real_init = StateFactory.init
    monkeypatch.setattr(StateFactory, "init", lambda self, seed: _poison(real_init(self, seed), "mu", 3e38))
    c = config_lib.apply_overrides(tiny(), [f"config.data.data_dir={tmp_path / 'tfds'}", "config.train.steps=8",
                                            "config.train.max_nonfinite_steps=3", "config.checkpoint.every_steps=1"])
    with pytest.raises(NonFiniteError, match="3 consecutive steps .up to step 3"):
        train(c, str(tmp_path / "w"), verbose=False)
    assert "step 1: the update would have made the parameters or optimizer state non-finite" in \
        capsys.readouterr().out
    skipped = [r["skipped"] for r in read_metrics(str(tmp_path / "w")) if "skipped" in r]
    assert skipped and all(s == 1 for s in skipped)
    params = jax.device_get(mmjax.load(str(tmp_path / "w")).encoder.params)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_the_carried_bound_holds_and_proves_the_updates(setup):
    c, mesh, factory, batch = setup
    assert factory.bound_rule is not None
    step = jit_train_step(c, factory, mesh)
    with jax.set_mesh(mesh):
        state = factory.init(c.seed)
        assert np.isinf(jax.device_get(state.bound)).all()  # unknown: the first update is checked exactly
        for i in range(4):
            state, metrics = step(state, batch)
            assert int(metrics["skipped"]) == 0
            bound, actual = jax.device_get((state.bound, jax.jit(measure_bound)(state.params, state.opt_state)))
            assert np.isfinite(bound).all() and (actual <= bound).all(), (i, actual, bound)
            assert bound.max() < BOUND_LIMIT


def test_a_state_changed_by_hand_must_reset_its_bound(setup):
    """The bound is trusted: a state whose values changed outside the step keeps its proof only if it is reset."""
    c, mesh, factory, batch = setup
    step = jit_train_step(c, factory, mesh)
    with jax.set_mesh(mesh):
        state, _ = step(factory.init(c.seed), batch)  # a state from the step: a known bound
        poisoned = _poison(state, "mu", 3e38).replace(bound=unknown_bound())
        before = jax.device_get(poisoned)
        new, metrics = step(poisoned, batch)
        assert int(metrics["skipped"]) == 1
        _assert_bit_identical((new.params, new.opt_state), (before.params, before.opt_state))
        assert np.isinf(jax.device_get(new.bound)).all()
        # Not reset: the stale bound proves the update finite (no dry run), and it goes through.
        stale, metrics = step(_poison(jax.device_put(before, factory.shardings).replace(bound=state.bound), "mu",
                                      3e38), batch)
        assert int(metrics["skipped"]) == 0


def test_the_bound_proves_nothing_about_unknown_nan_negative_or_huge_bounds():
    rule = optim.state_bound(optim.DEFAULTS, {"w": jnp.zeros((2,), jnp.float32)})
    assert rule is not None
    ok, new = rule.advance(jnp.array([10.0, 1.0, 1.0], jnp.float32), jnp.float32(0.5))
    assert bool(ok) and (np.asarray(new) >= [10.0, 1.0, 1.0]).all()
    for bound, norm in [([math.inf] * 3, 0.5), ([math.nan, 1, 1], 0.5), ([1, 1, -1], 0.5), ([1, 1e35, 1], 0.5),
                        ([1e37, 1, 1], 0.5), ([1, 1, 1], math.inf), ([1, 1, 1], math.nan)]:
        assert not bool(rule.advance(jnp.array(bound, jnp.float32), jnp.float32(norm))[0]), (bound, norm)
    # Configurations it cannot bound: every update is then checked exactly.
    for key, value in [("b1", 1.0), ("b2", 1.0), ("eps", 0.0), ("eps", 1e-30)]:
        assert optim.state_bound(dict(optim.DEFAULTS, **{key: value}), {"w": jnp.zeros((2,))}) is None, key
    assert optim.state_bound(optim.DEFAULTS, {"w": jnp.zeros((2,), jnp.bfloat16)}) is None


def test_measure_bound_sees_negative_nu():
    tx = optax.scale_by_adam()
    params = {"w": jnp.array([1.0, -3.0])}
    opt = tx.init(params)
    opt = opt._replace(mu={"w": jnp.array([0.5, -2.0])}, nu={"w": jnp.array([4.0, 0.0])})
    assert jax.device_get(measure_bound(params, opt)).tolist() == [3.0, 2.0, 4.0]
    opt = opt._replace(nu={"w": jnp.array([4.0, -1e-30])})
    assert np.isinf(jax.device_get(measure_bound(params, opt))[2])


def test_the_bound_is_not_saved_and_a_restored_state_starts_unknown(setup, tmp_path):
    c, mesh, factory, batch = setup
    with jax.set_mesh(mesh):
        state, _ = jit_train_step(c, factory, mesh)(factory.init(c.seed), batch)
        assert np.isfinite(jax.device_get(state.bound)).all()
        ckpt = Checkpointer(str(tmp_path / "ckpt"), async_save=False, log=lambda s: None)
        ckpt.save(1, state, force=True)
        assert "bound" not in integrity.leaf_paths(state)
        restored = ckpt.restore(1, factory.abstract)
        ckpt.close()
    assert isinstance(restored, TrainState)
    assert np.isinf(jax.device_get(restored.bound)).all()
    _assert_bit_identical(restored.saved(), state.saved())


def test_a_save_skips_the_nan_read_only_for_a_state_its_bound_proves_finite(setup, tmp_path):
    """A save reads the state for NaN/Inf unless the step's carried bound proves it finite; the checksums are the
    same either way, and a restore always reads (a state poisoned by hand behind a stale bound is refused there)."""
    c, mesh, factory, batch = setup
    with jax.set_mesh(mesh):
        fresh = factory.init(c.seed)
        assert not fresh.proven_finite()
        state, _ = jit_train_step(c, factory, mesh)(fresh, batch)
        assert state.proven_finite()
        read, trusted = integrity.summarize(state), integrity.summarize(state, known_finite=True)
        assert read == trusted and all(leaf["finite"] for leaf in read.values())
        ckpt = Checkpointer(str(tmp_path / "ckpt"), async_save=False, log=lambda s: None)
        ckpt.save(1, state, force=True)
        restored = ckpt.restore(1, factory.abstract)
        assert not restored.proven_finite()
        with pytest.raises(NonFiniteStateError):  # unknown bound: read, and refused
            ckpt.save(2, _poison(state, "nu", math.nan).replace(bound=unknown_bound()), force=True)
        ckpt.save(3, _poison(state, "nu", math.nan), force=True)  # the stale bound is trusted (TrainState's contract)
        with pytest.raises(integrity.CheckpointDamagedError, match="NaN"):
            ckpt.restore(3, factory.abstract)
        ckpt.close()
