"""Schedules, regex parameter rules, AdamW weight-decay masks, clipping and freezing."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mmjax.losses import gradcache
from mmjax.training import optim

LR, WD, B1, B2, EPS = 0.1, 0.5, 0.9, 0.98, 1e-6


def _cfg(**overrides):
    cfg = ml_collections.ConfigDict(dict(
        lr=LR, b1=B1, b2=B2, eps=EPS, weight_decay=WD, clip_norm=None, warmup_steps=0, decay='constant',
        end_lr_factor=0.0, wd_rules=optim.DEFAULT_WD_RULES, freeze_rules=()))
    cfg.update(overrides)
    return cfg


def _params():
    rng = np.random.default_rng(0)
    return {
        'image': {'Dense_0': {'kernel': jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
                              'bias': jnp.asarray(rng.normal(size=(4,)), jnp.float32)},
                  'LayerNorm_0': {'scale': jnp.ones((4,)), 'bias': jnp.zeros((4,))}},
        'text': {'Embed_0': {'embedding': jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)},
                 'proj': {'kernel': jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)}},
        'logit_scale': jnp.float32(2.0),
    }


def _grads(params, seed=1):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)


def _step(tx, params, grads):
    state = tx.init(params)
    updates, _ = jax.jit(tx.update)(grads, state, params)
    return updates


# ----------------------------------------------------------------------------------------------- schedules

@pytest.mark.parametrize('decay,mid,end', [
    ('cosine', 0.1 * (0.2 + 0.8 * 0.5), 0.1 * 0.2),
    ('linear', 0.1 * (1 + 0.2) / 2, 0.1 * 0.2),
    ('constant', 0.1, 0.1),
])
def test_schedule_values(decay, mid, end):
    schedule = optim.make_schedule(_cfg(lr=0.1, warmup_steps=10, decay=decay, end_lr_factor=0.2), 110)
    assert float(schedule(0)) == pytest.approx(0.0)
    assert float(schedule(5)) == pytest.approx(0.05)       # halfway through the linear warmup
    assert float(schedule(10)) == pytest.approx(0.1)       # end of warmup: peak
    assert float(schedule(60)) == pytest.approx(mid, rel=1e-5)  # halfway through the decay
    assert float(schedule(110)) == pytest.approx(end, rel=1e-5)  # end of training
    assert float(schedule(500)) == pytest.approx(end, rel=1e-5)  # stays there


def test_schedule_without_warmup_starts_at_peak():
    schedule = optim.make_schedule(_cfg(lr=0.3, warmup_steps=0, decay='cosine'), 100)
    assert float(schedule(0)) == pytest.approx(0.3)
    assert float(schedule(100)) == pytest.approx(0.0, abs=1e-7)


def test_schedule_errors():
    with pytest.raises(ValueError, match='optim.decay'):
        optim.make_schedule(_cfg(decay='exp'), 10)
    with pytest.raises(ValueError, match='optim.warmup_steps'):
        optim.make_schedule(_cfg(warmup_steps=20, decay='cosine'), 10)


def test_missing_keys_take_defaults():
    schedule = optim.make_schedule({'lr': 0.2}, 10)  # DEFAULTS: no warmup, cosine to 0
    assert float(schedule(0)) == pytest.approx(0.2)
    assert float(schedule(10)) == pytest.approx(0.0, abs=1e-7)


# ----------------------------------------------------------------------------------------------- labels

def test_param_labels_first_match_wins_and_paths_join_keys():
    rules = [('image/.*/bias', 'a'), ('.*bias', 'b'), ('text/.*', 'c'), ('.*', 'd')]
    labels = optim.param_labels(_params(), rules)
    assert labels == {
        'image': {'Dense_0': {'kernel': 'd', 'bias': 'a'}, 'LayerNorm_0': {'scale': 'd', 'bias': 'a'}},
        'text': {'Embed_0': {'embedding': 'c'}, 'proj': {'kernel': 'c'}},
        'logit_scale': 'd',
    }


def test_param_labels_uses_fullmatch():
    labels = optim.param_labels({'a': {'kernel_bias': 0, 'bias': 0}}, [('.*/bias', 1), ('.*', 2)])
    assert labels == {'a': {'kernel_bias': 2, 'bias': 1}}


def test_unmatched_param_raises_naming_it():
    with pytest.raises(ValueError, match="'text/proj/kernel' matches no rule"):
        optim.param_labels(_params(), [('image/.*', 1), ('.*(bias|scale|embedding)', 0)])


def test_default_wd_rules():
    labels = optim.param_labels(_params(), optim.DEFAULT_WD_RULES)
    assert labels['image']['Dense_0'] == {'kernel': 1.0, 'bias': 0.0}
    assert labels['image']['LayerNorm_0'] == {'scale': 0.0, 'bias': 0.0}
    assert labels['text'] == {'Embed_0': {'embedding': 0.0}, 'proj': {'kernel': 1.0}}
    assert labels['logit_scale'] == 0.0
    extra = optim.param_labels({'pos_embed': 0, 'cls': 0, 'logit_bias': 0, 'img': {'pos_embedding': 0}},
                               optim.DEFAULT_WD_RULES)
    assert extra == {'pos_embed': 0.0, 'cls': 0.0, 'logit_bias': 0.0, 'img': {'pos_embedding': 0.0}}


class _Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(4, kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ('embed', 'mlp')),
                     bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('mlp',)))(x)
        x = nn.LayerNorm()(x)
        scale = self.param('logit_scale', nn.with_logical_partitioning(nn.initializers.ones, ()), ())
        return x * scale


def test_labels_on_boxed_and_abstract_params():
    boxed = _Tiny().init(jax.random.key(0), jnp.ones((1, 3)))['params']
    abstract_boxed = jax.eval_shape(lambda: boxed)
    expected = optim.param_labels(nn.unbox(boxed), optim.DEFAULT_WD_RULES)
    assert expected == {'Dense_0': {'kernel': 1.0, 'bias': 0.0}, 'LayerNorm_0': {'scale': 0.0, 'bias': 0.0},
                        'logit_scale': 0.0}
    assert optim.param_labels(boxed, optim.DEFAULT_WD_RULES) == expected
    assert optim.param_labels(abstract_boxed, optim.DEFAULT_WD_RULES) == expected
    assert optim.param_labels(jax.eval_shape(lambda: nn.unbox(boxed)), optim.DEFAULT_WD_RULES) == expected


# ----------------------------------------------------------------------------------------------- AdamW

def test_weight_decay_mask():
    params, grads = _params(), _grads(_params())
    tx, _ = optim.build_optimizer(_cfg(), params, 10)
    adam = _step(optax.adam(LR, b1=B1, b2=B2, eps=EPS), params, grads)
    updates = _step(tx, params, grads)
    # No-decay parameters: exactly Adam.
    for path in (('image', 'Dense_0', 'bias'), ('image', 'LayerNorm_0', 'scale'), ('text', 'Embed_0', 'embedding'),
                 ('logit_scale',)):
        get = lambda t, path=path: t[path[0]] if len(path) == 1 else t[path[0]][path[1]][path[2]]  # noqa: E731
        np.testing.assert_allclose(get(updates), get(adam), rtol=1e-6, atol=1e-8)
    # Decayed parameters: Adam minus lr * wd * param.
    for tower, layer in (('image', 'Dense_0'), ('text', 'proj')):
        kernel = params[tower][layer]['kernel']
        np.testing.assert_allclose(updates[tower][layer]['kernel'],
                                   adam[tower][layer]['kernel'] - LR * WD * kernel, rtol=1e-6, atol=1e-7)
        assert float(jnp.abs(LR * WD * kernel).max()) > 1e-3  # the decay term is visible


def test_weight_decay_multiplier_scales_decay():
    params, grads = _params(), _grads(_params())
    rules = [('image/.*/kernel', 0.25), ('text/proj/kernel', 2.0), ('.*', 0.0)]
    tx, _ = optim.build_optimizer(_cfg(wd_rules=rules), params, 10)
    adam = _step(optax.adam(LR, b1=B1, b2=B2, eps=EPS), params, grads)
    updates = _step(tx, params, grads)
    for tower, layer, mult in (('image', 'Dense_0', 0.25), ('text', 'proj', 2.0)):
        np.testing.assert_allclose(updates[tower][layer]['kernel'],
                                   adam[tower][layer]['kernel'] - LR * WD * mult * params[tower][layer]['kernel'],
                                   rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(updates['image']['Dense_0']['bias'], adam['image']['Dense_0']['bias'], rtol=1e-6)


def test_build_optimizer_unmatched_param_raises():
    with pytest.raises(ValueError, match="optim.wd_rules: parameter 'text/proj/kernel' matches no rule"):
        optim.build_optimizer(_cfg(wd_rules=[('image/.*', 1.0), ('.*(bias|scale|embedding)', 0.0)]), _params(), 10)


def test_build_optimizer_rejects_bad_multiplier():
    with pytest.raises(ValueError, match='multiplier'):
        optim.build_optimizer(_cfg(wd_rules=[('.*', -1.0)]), _params(), 10)


def test_schedule_drives_updates():
    params, grads = _params(), _grads(_params())
    tx, schedule = optim.build_optimizer(_cfg(warmup_steps=2, decay='linear', weight_decay=0.0), params, 4)
    adam = optax.scale_by_adam(b1=B1, b2=B2, eps=EPS)
    adam_state, state = adam.init(params), tx.init(params)
    update = jax.jit(tx.update)
    for step in range(3):
        direction, adam_state = adam.update(grads, adam_state, params)
        updates, state = update(grads, state, params)
        for got, want in zip(jax.tree.leaves(updates), jax.tree.leaves(direction)):
            np.testing.assert_allclose(got, -float(schedule(step)) * np.asarray(want), rtol=1e-6, atol=1e-9)
    assert [float(schedule(s)) for s in range(3)] == pytest.approx([0.0, LR / 2, LR])


def test_gradient_clipping():
    params = {'w': jnp.zeros((2,))}
    big = {'w': jnp.asarray([300.0, 400.0])}    # global norm 500
    small = {'w': jnp.asarray([0.3, 0.4])}      # global norm 0.5
    # eps = 1 makes Adam's first step g / (|g| + 1) depend on the gradient's scale, so clipping is visible.
    cfg = _cfg(clip_norm=1.0, eps=1.0, weight_decay=0.0)
    tx, _ = optim.build_optimizer(cfg, params, 10)
    clipped = np.asarray([0.6, 0.8])
    np.testing.assert_allclose(_step(tx, params, big)['w'], -LR * clipped / (clipped + 1.0), rtol=1e-5)
    np.testing.assert_allclose(_step(tx, params, small)['w'], -LR * np.asarray([0.3, 0.4]) / [1.3, 1.4], rtol=1e-5)
    tx_off, _ = optim.build_optimizer(_cfg(clip_norm=None, eps=1.0, weight_decay=0.0), params, 10)
    np.testing.assert_allclose(_step(tx_off, params, big)['w'], -LR * np.asarray([300.0, 400.0]) / [301.0, 401.0],
                               rtol=1e-5)
    with pytest.raises(ValueError, match='optim.clip_norm'):
        optim.build_optimizer(_cfg(clip_norm=0.0), params, 10)


# ----------------------------------------------------------------------------------------------- freezing

def test_freeze_rules():
    params, grads = _params(), _grads(_params())
    cfg = _cfg(freeze_rules=['image/.*'])
    tx, _ = optim.build_optimizer(cfg, params, 10)
    state = tx.init(params)
    updates, _ = jax.jit(tx.update)(grads, state, params)
    for leaf in jax.tree.leaves(updates['image']):
        assert float(jnp.abs(leaf).max()) == 0.0
    # Trainable parameters: as if the frozen ones did not exist.
    trainable = {k: v for k, v in params.items() if k != 'image'}
    tx_plain, _ = optim.build_optimizer(_cfg(), trainable, 10)
    expected = _step(tx_plain, trainable, {k: v for k, v in grads.items() if k != 'image'})
    for got, want in zip(jax.tree.leaves({k: updates[k] for k in trainable}), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)
    # Frozen parameters hold no optimizer state.
    n_state = sum(x.size for x in jax.tree.leaves(state))
    n_trainable = sum(x.size for x in jax.tree.leaves(trainable))
    assert n_state == 2 * n_trainable + 2  # mu, nu, adam count, schedule count


def test_freeze_rule_matching_nothing_raises():
    with pytest.raises(ValueError, match="optim.freeze_rules: 'audio/.\\*' matches no parameter"):
        optim.build_optimizer(_cfg(freeze_rules=['audio/.*']), _params(), 10)


def test_frozen_params_do_not_count_in_clip_norm():
    params = {'a': jnp.zeros((2,)), 'b': jnp.zeros((1,))}
    grads = {'a': jnp.asarray([0.3, 0.4]), 'b': jnp.asarray([1000.0])}
    tx, _ = optim.build_optimizer(_cfg(clip_norm=1.0, eps=1.0, weight_decay=0.0, freeze_rules=['b']), params, 10)
    updates = _step(tx, params, grads)
    np.testing.assert_allclose(updates['a'], -LR * np.asarray([0.3, 0.4]) / [1.3, 1.4], rtol=1e-5)  # not clipped
    assert float(updates['b'][0]) == 0.0



def test_clip_takes_the_callers_norm():
    """The train step passes the gradients' norm it computed for its metrics; clipping by it is clipping by
    the norm the optimizer would compute, and the norm given is the one used."""
    params = {'a': jnp.zeros((2,)), 'b': jnp.zeros((1,))}
    grads = {'a': jnp.asarray([3.0, 4.0]), 'b': jnp.asarray([12.0])}  # global norm 13
    tx, _ = optim.build_optimizer(_cfg(clip_norm=1.0, eps=1.0, weight_decay=0.0), params, 10)
    state = tx.init(params)
    own, _ = tx.update(grads, state, params)
    given, _ = tx.update(grads, state, params, grad_norm=optax.global_norm(grads))
    for got, want in zip(jax.tree.leaves(given), jax.tree.leaves(own)):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    # Told 26, clipping scales by 1/26 (not 1/13): Adam's first step g / (|g| + 1) shows it.
    told, _ = tx.update(grads, state, params, grad_norm=jnp.asarray(26.0))
    np.testing.assert_allclose(told['b'], -LR * np.asarray([12.0 / 26]) / (12.0 / 26 + 1.0), rtol=1e-5)



def test_clipping_costs_one_read_of_the_gradients():
    """The update is memory-bound: clipping may add the norm's read of every gradient, and no copy of them
    (optax's per-element divide wrote each clipped gradient out first: 2x slower update for ViT-B/32)."""
    params = {'a': jnp.ones((512, 256)), 'b': jnp.ones((256, 512)), 'c': jnp.ones((256,))}
    grads = jax.tree.map(lambda p: p * 0.01, params)
    grad_bytes = sum(g.size * g.dtype.itemsize for g in jax.tree.leaves(grads))
    accessed = {}
    for clip_norm in (1.0, None):
        tx, _ = optim.build_optimizer(_cfg(clip_norm=clip_norm), params, 10)

        def update(params, state, grads, tx=tx):
            updates, state = tx.update(grads, state, params, grad_norm=optax.global_norm(grads))
            return optax.apply_updates(params, updates), state

        compiled = jax.jit(update, donate_argnums=(0, 1)).lower(params, tx.init(params), grads).compile()
        cost = compiled.cost_analysis()
        accessed[clip_norm] = (cost[0] if isinstance(cost, list) else cost)['bytes accessed']
        assert compiled.memory_analysis().temp_size_in_bytes < 0.1 * grad_bytes, clip_norm
    assert accessed[1.0] - accessed[None] <= 1.1 * grad_bytes, accessed

def test_stop_frozen_gradients_zeroes_exactly_the_frozen_gradients():
    params = {'a': jnp.asarray([1.0, 2.0]), 'b': jnp.asarray([3.0])}

    def loss(p):
        p = gradcache.stop_frozen_gradients(p, {'a': True, 'b': False})
        return jnp.sum(p['a'] ** 2) * p['b'][0]

    grads = jax.grad(loss)(params)
    np.testing.assert_allclose(grads['a'], [6.0, 12.0])
    np.testing.assert_array_equal(grads['b'], [0.0])
    assert gradcache.stop_frozen_gradients(params, None) is params

# ----------------------------------------------------------------------------------------------- abstract params

def test_build_from_abstract_boxed_params_and_train():
    model = _Tiny()
    boxed_abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 3)))['params']
    tx, _ = optim.build_optimizer(_cfg(clip_norm=1.0, freeze_rules=['LayerNorm_0/.*']), boxed_abstract, 10)
    params = nn.unbox(model.init(jax.random.key(0), jnp.ones((1, 3)))['params'])
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 3)), jnp.float32)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(lambda p: jnp.mean(model.apply({'params': p}, x) ** 2))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    state = tx.init(params)
    new_params, state, loss0 = step(params, state)
    for _ in range(5):
        new_params, state, loss = step(new_params, state)
    assert float(loss) < float(loss0)
    np.testing.assert_array_equal(new_params['LayerNorm_0']['scale'], params['LayerNorm_0']['scale'])
    assert not np.allclose(new_params['Dense_0']['kernel'], params['Dense_0']['kernel'])
