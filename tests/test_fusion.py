"""Tests for mmjax.models.fusion and mmjax.models.fusion_model: masks, identity at init, ranges, errors, meshes."""

import math
import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P

import mmjax.config  # noqa: E402
import mmjax.runtime.sharding  # noqa: E402
from mmjax.models import fusion_model  # noqa: E402
from mmjax.models.encoders import TextTransformer  # noqa: E402
from mmjax.models.fusion import (  # noqa: E402
    CoAttention,
    ConcatFusion,
    CrossAttention,
    CrossAttentionFusion,
    GatedCrossAttentionBlock,
    GatedFusion,
    GatedXAttnTextEncoder,
    WeightedSumFusion,
    build_fusion,
)
from mmjax.models.fusion_model import ItmMlmHeads, build_fusion_classifier, build_itm_mlm_model  # noqa: E402

RULES = mmjax.config.DEFAULT_RULES
PARAM_AXES = {'embed', 'mlp', 'heads', 'kv', 'vocab', 'patch', 'length', 'joint', 'layers', 'channels', None}
B, IMG, LEN, VOCAB = 8, 8, 8, 259
KEY = jax.random.key(0)


def normal(seed, shape, scale=1.0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32) * scale


def length_mask(lengths, total):
    """bool [len(lengths), total]: True for the first lengths[i] positions."""
    return jnp.arange(total)[None, :] < jnp.asarray(lengths)[:, None]


def make_tokens(lengths, total=LEN, seed=0):
    """int32 [len(lengths), total]: BOS=1, random bytes, EOT=2 at position length-1, pad 0 after."""
    rng = np.random.default_rng(seed)
    out = np.zeros((len(lengths), total), np.int32)
    for i, n in enumerate(lengths):
        out[i, 0] = 1
        out[i, 1:n - 1] = rng.integers(3, VOCAB, n - 2)
        out[i, n - 1] = 2
    return jnp.asarray(out)


def junk_after(tokens, mask, seed=1):
    """tokens with every invalid (mask False) position replaced by random non-pad ids."""
    junk = jax.random.randint(jax.random.key(seed), tokens.shape, 3, VOCAB)
    return jnp.where(mask, tokens, junk)


def model_config(**overrides) -> ml_collections.ConfigDict:
    """Tiny `config.model` with fusion and itm_mlm sections (image width 32, text width 16)."""
    cfg = ml_collections.ConfigDict(dict(
        embed_dim=16, dtype='float32', param_dtype='float32', remat='none', scan_layers=False, loss='softmax',
        logit_scale_init=math.log(1 / 0.07), logit_scale_max=math.log(100), logit_bias_init=None,
        image=dict(image_size=IMG, patch_size=4, channels=3, width=32, depth=1, num_heads=2, mlp_dim=32, pool='cls'),
        text=dict(vocab_size=VOCAB + 1, max_len=LEN, width=16, depth=1, num_heads=2, mlp_dim=32, causal=True,
                  pool='eot'),
        fusion=dict(mode='gated', num_layers=1, num_heads=2, mlp_dim=32, hidden=32, num_classes=5, proj_dim=16),
        itm_mlm=dict(num_layers=1, num_heads=2, mlp_dim=32)))
    cfg.update_from_flattened_dict(overrides)
    return cfg


def image_text_batch(seed=0):
    lengths = [3, 8, 5, 2, 6, 8, 4, 7]
    return {'image': normal(seed, (B, IMG, IMG, 3)), 'text': make_tokens(lengths, seed=seed),
            'text_mask': length_mask(lengths, LEN)}


def partitioned_leaves(variables):
    return jax.tree_util.tree_flatten_with_path(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]


def open_gates(variables, value=0.5):
    """Sets every tanh gate ('attn_gate', 'ff_gate') to `value` so the gated paths are exercised."""
    def fn(path, x):
        if isinstance(x, nn.Partitioned) and str(getattr(path[-1], 'key', '')).endswith('_gate'):
            return x.replace_boxed(jnp.full((), value, x.value.dtype))
        return x
    return jax.tree_util.tree_map_with_path(fn, variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def init_and_apply(module, init_args, calls, **apply_kw):
    """In ONE jit (one compile, as compiling dominates these tests): variables = module.init(KEY, *init_args) and
    [module.apply(f(variables) if f else variables, *args, **apply_kw) for f, args in calls]."""
    def fn(init_args, call_args):
        v = module.init(KEY, *init_args)
        return v, [module.apply(f(v) if f else v, *a, **apply_kw) for (f, _), a in zip(calls, call_args)]
    return jax.jit(fn)(init_args, [a for _, a in calls])


# --------------------------------------------------------------------------------------------- cross attention

def test_cross_attention_respects_key_mask_and_keeps_query_width():
    x, y = normal(1, (4, 5, 32)), normal(2, (4, 7, 16))
    y_mask = length_mask([3, 7, 1, 5], 7)
    changed = jnp.where(y_mask[..., None], y, normal(3, y.shape, 5.0))
    _, (out, out2, free, free2) = init_and_apply(CrossAttention(num_heads=2), (x, y, y_mask), [
        (None, (x, y, y_mask)), (None, (x, changed, y_mask)), (None, (x, y, None)), (None, (x, changed, None))])
    assert out.shape == (4, 5, 32)
    np.testing.assert_allclose(out2, out, atol=1e-5)
    assert np.abs(free2 - free).max() > 1e-3
    assert np.abs(out - x).max() > 1e-3  # a residual plus an attention term that is not zero


@pytest.mark.parametrize('mlp_dim', [None, 32])
def test_co_attention_respects_both_masks(mlp_dim):
    a, b = normal(1, (4, 6, 16)), normal(2, (4, 5, 32))
    a_mask, b_mask = length_mask([2, 6, 4, 1], 6), length_mask([5, 3, 1, 4], 5)
    a2 = jnp.where(a_mask[..., None], a, normal(3, a.shape, 5.0))
    b2 = jnp.where(b_mask[..., None], b, normal(4, b.shape, 5.0))
    _, ((a_out, b_out), (a_out2, b_out2), (a_ref, b_ref), (a_free, b_free)) = init_and_apply(
        CoAttention(num_heads=2, mlp_dim=mlp_dim), (a, b, a_mask, b_mask), [
            (None, (a, b, a_mask, b_mask)), (None, (a2, b2, a_mask, b_mask)),
            (None, (a, b, None, None)), (None, (a2, b2, None, None))])
    assert a_out.shape == a.shape and b_out.shape == b.shape
    va, vb = a_mask[..., None], b_mask[..., None]
    # Padded inputs of one side never reach the other side; valid positions of each side are unchanged.
    np.testing.assert_allclose(np.where(va, a_out2, 0), np.where(va, a_out, 0), atol=1e-5)
    np.testing.assert_allclose(np.where(vb, b_out2, 0), np.where(vb, b_out, 0), atol=1e-5)
    assert np.abs(np.where(va, a_free - a_ref, 0)).max() > 1e-3
    assert np.abs(np.where(vb, b_free - b_ref, 0)).max() > 1e-3


def test_cross_attention_fusion_respects_masks_and_pools():
    a, b = normal(1, (4, 6, 16)), normal(2, (4, 5, 32))
    a_mask, b_mask = length_mask([2, 6, 4, 1], 6), length_mask([5, 3, 1, 4], 5)
    a2 = jnp.where(a_mask[..., None], a, normal(3, a.shape, 5.0))
    b2 = jnp.where(b_mask[..., None], b, normal(4, b.shape, 5.0))
    module = build_fusion('xattn', num_heads=2, proj_dim=8)
    assert isinstance(module, CrossAttentionFusion) and module.needs_tokens
    _, (out, out2, free, free2) = init_and_apply(module, (a, b, a_mask, b_mask), [
        (None, (a, b, a_mask, b_mask)), (None, (a2, b2, a_mask, b_mask)), (None, (a, b, None, None)),
        (None, (a2, b2, None, None))])
    assert out.shape == (4, 8)
    np.testing.assert_allclose(out2, out, atol=1e-5)
    assert np.abs(free2 - free).max() > 1e-3


# --------------------------------------------------------------------------------------------- feature fusion

@pytest.mark.parametrize('lead', [(4,), (4, 3)])
def test_concat_fusion_shapes(lead):
    a, b = normal(1, lead + (16,)), normal(2, lead + (32,))
    v, (out,) = init_and_apply(ConcatFusion(proj_dim=24), (a, b), [(None, (a, b))])
    assert out.shape == lead + (24,)
    kernel = v['params']['proj']['kernel']
    assert kernel.value.shape == (48, 24) and kernel.names == ('embed', 'joint')
    p = nn.meta.unbox(v['params'])['proj']
    want = np.concatenate([a, b], -1) @ np.asarray(p['kernel']) + np.asarray(p['bias'])
    np.testing.assert_allclose(out, want, atol=1e-5)
    same = jax.eval_shape(ConcatFusion().init_with_output, KEY, a, a)[0]
    assert same.shape == lead + (16,)  # default width: the common input width


@pytest.mark.parametrize('per_feature', [True, False])
def test_weighted_fusion_alpha_in_unit_interval_and_output_between_inputs(per_feature):
    a, b = normal(1, (4, 3, 16)), normal(2, (4, 3, 16))
    shape = (16,) if per_feature else ()
    seeds = range(4)

    def set_alpha(seed):
        return lambda v: {'params': {'alpha_logit': v['params']['alpha_logit'].replace_boxed(
            normal(10 + seed, shape, 4.0))}}

    v, outs = init_and_apply(WeightedSumFusion(per_feature=per_feature), (a, b),
                             [(None, (a, b))] + [(set_alpha(s), (a, b)) for s in seeds], mutable='intermediates')
    assert v['params']['alpha_logit'].names == (('embed',) if per_feature else ())
    out, state = outs[0]
    np.testing.assert_allclose(state['intermediates']['alpha'][0], 0.5)  # sigmoid(0) at init
    np.testing.assert_allclose(out, 0.5 * (a + b), atol=1e-6)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    for seed, (out, state) in zip(seeds, outs[1:]):
        alpha = np.asarray(state['intermediates']['alpha'][0])
        assert alpha.shape == shape and np.all(alpha > 0) and np.all(alpha < 1)
        np.testing.assert_allclose(alpha, 1 / (1 + np.exp(-np.asarray(normal(10 + seed, shape, 4.0)))), rtol=1e-5)
        np.testing.assert_allclose(out, alpha * a + (1 - alpha) * b, atol=1e-5)
        assert np.all(out >= lo - 1e-6) and np.all(out <= hi + 1e-6)


def test_gated_fusion_lies_between_inputs_elementwise():
    a, b = normal(1, (8, 16), 3.0), normal(2, (8, 16), 3.0)

    def big(v):  # large random gate weights push gates towards 0 and 1 as well as in between
        return jax.tree_util.tree_map(lambda x: x.replace_boxed(normal(3, x.value.shape, 2.0)), v,
                                      is_leaf=lambda x: isinstance(x, nn.Partitioned))

    _, ((out, state), (swapped, _)) = init_and_apply(GatedFusion(), (a, b), [(big, (a, b)), (big, (b, a))],
                                                     mutable='intermediates')
    assert out.shape == (8, 16)
    g = np.asarray(state['intermediates']['gate'][0])
    assert g.min() < 0.05 and g.max() > 0.95 and np.all((g >= 0) & (g <= 1))
    np.testing.assert_allclose(out, g * a + (1 - g) * b, atol=1e-5)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    assert np.all(out >= lo - 1e-5) and np.all(out <= hi + 1e-5)
    assert np.abs(swapped - out).max() > 1e-3  # the gate depends on the inputs, not just on their order


@pytest.mark.parametrize('mode,cls', [('weighted', WeightedSumFusion), ('gated', GatedFusion),
                                      ('concat', ConcatFusion)])
def test_mismatched_widths_need_a_projection(mode, cls):
    a, b = normal(1, (4, 16)), normal(2, (4, 24))
    module = build_fusion(mode)
    assert isinstance(module, cls) and not module.needs_tokens
    with pytest.raises(ValueError, match=r'16 and 24.*proj_dim'):
        jax.eval_shape(module.init, KEY, a, b)
    projected = build_fusion(mode, proj_dim=8)
    assert jax.eval_shape(projected.init_with_output, KEY, a, b)[0].shape == (4, 8)


def test_build_fusion_rejects_unknown_mode_and_xattn_without_heads():
    with pytest.raises(ValueError, match='model.fusion.mode'):
        build_fusion('sum')
    with pytest.raises(ValueError, match='num_heads'):
        build_fusion('xattn')


# --------------------------------------------------------------------------------------------- gated xattn

def test_gated_cross_attention_block_is_identity_at_init_and_not_after():
    x, y = normal(1, (4, 5, 16), 3.0), normal(2, (4, 6, 32))
    y_mask = length_mask([6, 2, 3, 1], 6)
    changed = jnp.where(y_mask[..., None], y, normal(3, y.shape, 5.0))
    module = GatedCrossAttentionBlock(num_heads=2, mlp_dim=32)
    v = jax.jit(module.init)(KEY, x, y, y_mask)
    for name in ('attn_gate', 'ff_gate'):
        assert v['params'][name].names == () and float(v['params'][name].value) == 0.0
    apply = jax.jit(lambda v, y: (module.apply(v, x, y, y_mask), module.apply(open_gates(v), x, y, y_mask)))
    (same, out), (_, out2) = apply(v, y), apply(v, changed)
    np.testing.assert_array_equal(same, x)  # exactly the identity
    assert np.abs(out - x).max() > 1e-2
    np.testing.assert_allclose(out2, out, atol=1e-5)


def strip_xattn(params):
    return {k: strip_xattn(v) if isinstance(v, dict) else v for k, v in params.items() if not k.startswith('xattn_')}


@pytest.mark.parametrize('every,causal,pool', [(1, True, 'eot'), (2, False, 'cls')])
def test_gated_xattn_text_encoder_equals_plain_tower_at_init(every, causal, pool):
    kw = dict(vocab_size=VOCAB, max_len=LEN, width=16, depth=3, num_heads=2, mlp_dim=32, causal=causal, pool=pool)
    tokens = make_tokens([3, 8, 5, 2])
    context, context_mask = normal(1, (4, 5, 32)), length_mask([5, 1, 3, 2], 5)
    changed = jnp.where(context_mask[..., None], context, normal(2, context.shape, 5.0))
    model, plain = GatedXAttnTextEncoder(xattn_every=every, **kw), TextTransformer(**kw)
    v = jax.jit(model.init)(KEY, tokens, context, context_mask)
    names = sorted(k for k in v['params']['transformer'] if k.startswith('xattn_'))
    assert names == sorted(f'xattn_{i}' for i in range(3) if (i + 1) % every == 0)
    is_box = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
    assert (jax.tree_util.tree_structure(strip_xattn(v['params']), is_leaf=is_box)
            == jax.tree_util.tree_structure(jax.eval_shape(plain.init, KEY, tokens)['params'], is_leaf=is_box))

    @jax.jit
    def run(v):
        return (plain.apply({'params': strip_xattn(v['params'])}, tokens),
                model.apply(v, tokens, context, context_mask),
                model.apply(open_gates(v), tokens, context, context_mask)[0],
                model.apply(open_gates(v), tokens, changed, context_mask)[0])

    (want_tokens, want_pooled), (got_tokens, got_pooled), opened, opened_changed = run(v)
    np.testing.assert_allclose(got_tokens, want_tokens, atol=1e-6)
    np.testing.assert_allclose(got_pooled, want_pooled, atol=1e-6)
    # Opening the gates makes the context matter, and masked context positions still do not.
    assert np.abs(opened - want_tokens).max() > 1e-3
    np.testing.assert_allclose(opened_changed, opened, atol=1e-5)


# --------------------------------------------------------------------------------------------- fusion classifier

@pytest.mark.parametrize('mode', ['weighted', 'xattn'])  # pooled-feature and token-sequence fusion paths
def test_fusion_classifier_ignores_padded_text(mode):
    model = build_fusion_classifier(model_config(**{'fusion.mode': mode}))
    batch = image_text_batch()
    junk = dict(batch, text=junk_after(batch['text'], batch['text_mask']))
    unmasked = dict(junk, text_mask=jnp.ones_like(batch['text_mask']))  # junk is attended to
    no_mask = {k: batch[k] for k in ('image', 'text')}  # default mask: text != 0
    v, (logits, junk_logits, unmasked_logits, default_logits) = init_and_apply(
        model, (batch,), [(None, (batch,)), (None, (junk,)), (None, (unmasked,)), (None, (no_mask,))])
    assert logits.shape == (B, 5) and logits.dtype == jnp.float32
    assert set(v['params']) == {'image', 'text', 'coattn_0', 'fusion', 'head'}
    assert set(v['params']['image']) == {'encoder'} and set(v['params']['text']) == {'encoder'}
    np.testing.assert_allclose(junk_logits, logits, atol=1e-5)
    np.testing.assert_allclose(default_logits, logits, atol=1e-5)
    assert np.abs(unmasked_logits - logits).max() > 1e-4
    assert np.abs(logits[0] - logits[1]).max() > 1e-5  # every example gets its own logits


def test_fusion_classifier_config_errors():
    batch = image_text_batch()
    model = build_fusion_classifier(model_config(**{'fusion.mode': 'weighted', 'fusion.proj_dim': None}))
    with pytest.raises(ValueError, match=r'16 and 32.*proj_dim'):  # text width 16, image width 32
        jax.eval_shape(model.init, KEY, batch)
    cfg = model_config()
    cfg.fusion.unknown = 1
    with pytest.raises(ValueError, match='model.fusion.unknown'):
        build_fusion_classifier(cfg)
    with pytest.raises(ValueError, match='model.fusion.num_classes'):
        build_fusion_classifier(model_config(**{'fusion.num_classes': None}))
    with pytest.raises(ValueError, match='model.fusion.mode'):
        build_fusion_classifier(model_config(**{'fusion.mode': 'product'}))


# --------------------------------------------------------------------------------------------- ITM / MLM

def test_itm_mlm_heads_shapes_and_masks():
    heads = ItmMlmHeads(vocab_size=VOCAB + 1, width=16, num_layers=1, num_heads=2, mlp_dim=32, pool='eot')
    image, text = normal(1, (4, 5, 32)), normal(2, (4, LEN, 16))
    mask = length_mask([3, 8, 5, 2], LEN)
    changed = jnp.where(mask[..., None], text, normal(3, text.shape, 5.0))
    v, (out, out2, out3) = init_and_apply(heads, (image, text, mask), [
        (None, (image, text, mask)), (None, (image, changed, mask)), (None, (normal(4, image.shape), text, mask))])
    assert out['fused'].shape == (4, LEN, 16)
    assert out['itm_logits'].shape == (4,) and out['mlm_logits'].shape == (4, LEN, VOCAB + 1)
    assert v['params']['mlm_out']['kernel'].value.shape == (16, 384)  # vocab rows rounded up for sharding
    np.testing.assert_allclose(out2['itm_logits'], out['itm_logits'], atol=1e-5)
    np.testing.assert_allclose(np.where(mask[..., None], out2['mlm_logits'], 0),
                               np.where(mask[..., None], out['mlm_logits'], 0), atol=1e-4)
    assert np.abs(out3['itm_logits'] - out['itm_logits']).max() > 1e-4  # the ITM logit depends on the image
    with pytest.raises(ValueError, match='model.text.width'):
        jax.eval_shape(heads.init, KEY, image, normal(2, (4, LEN, 32)), mask)


def test_itm_mlm_model_outputs_and_contrastive_params_subset():
    model = build_itm_mlm_model(model_config())
    batch = {k: image_text_batch()[k] for k in ('image', 'text')}
    masked = dict(batch, mlm_text=jnp.where(batch['text'] > 2, VOCAB, batch['text']))

    def separate_itm(module, batch):
        """ITM logits of positives, (image, hardest negative text) and (hardest negative image, text), one by one."""
        out = module.tower_outputs(batch)
        img, txt, mask = out['image']['tokens'], out['text']['tokens'], batch['text'] != 0
        sim = module.scale * out['image']['embedding'] @ out['text']['embedding'].T
        neg_text, neg_image = fusion_model.itm_negatives(sim), fusion_model.itm_negatives(sim.T)
        itm = lambda i, t, m: module.itm_mlm.itm(module.itm_mlm.fuse(i, t, m), m)  # noqa: E731
        return itm(img, txt, mask), itm(img, txt[neg_text], mask[neg_text]), itm(img[neg_image], txt, mask)

    @jax.jit
    def run(rng):
        v = model.init(KEY, batch)
        return (v, model.apply(v, batch, rngs={'itm': rng}), model.apply(v, batch), model.apply(v, masked),
                model.apply(v, batch, method=separate_itm))

    v, sampled, hardest, out_masked, (pos, neg_t, neg_i) = run(jax.random.key(1))
    np.testing.assert_allclose(hardest['itm_logits_pos'], pos, atol=1e-5)
    np.testing.assert_allclose(hardest['itm_logits_neg'], np.concatenate([neg_t, neg_i]), atol=1e-5)
    assert np.abs(neg_t - pos).max() > 1e-5
    assert set(v['params']) == {'image', 'text', 'logit_scale', 'itm_mlm'}
    assert sampled['itm_logits_pos'].shape == (B,) and sampled['itm_logits_neg'].shape == (2 * B,)
    assert sampled['mlm_logits'].shape == (B, LEN, VOCAB + 1)
    assert sampled['embeddings']['image'].shape == (B, 16)
    np.testing.assert_allclose(hardest['itm_logits_pos'], sampled['itm_logits_pos'], atol=1e-6)
    assert np.abs(out_masked['mlm_logits'] - hardest['mlm_logits']).max() > 1e-4


def test_every_param_is_logically_partitioned():
    batch = image_text_batch()
    trees = [jax.eval_shape(build_fusion_classifier(model_config(**{'fusion.mode': m})).init, KEY, batch)
             for m in ('concat', 'weighted', 'gated', 'xattn')]
    trees.append(jax.eval_shape(build_itm_mlm_model(model_config()).init, KEY, batch))
    trees.append(jax.eval_shape(GatedXAttnTextEncoder(VOCAB, LEN, 16, 2, 2, 32).init, KEY, batch['text'],
                                normal(1, (B, 5, 32))))
    for tree in trees:
        leaves = partitioned_leaves(tree)
        assert len(leaves) == len(jax.tree_util.tree_leaves(tree))
        for path, leaf in leaves:
            assert isinstance(leaf, nn.Partitioned), path
            assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= PARAM_AXES, (path, leaf.names)


# --------------------------------------------------------------------------------------------- meshes

class Bundle(nn.Module):
    """Every new module side by side, so a mesh layout costs one init and one apply compile.
    Returns {module name: its output}."""

    @nn.compact
    def __call__(self, d):
        x, y, x_mask, y_mask, text = d['x'], d['y'], d['x_mask'], d['y_mask'], d['text']
        shallow = {'image.depth': 0, 'text.depth': 0}  # the towers are tested elsewhere; keep compiles small
        classifier = build_fusion_classifier(model_config(**{'fusion.mode': 'xattn'}, **shallow))
        itm_mlm = build_itm_mlm_model(model_config(**shallow))
        return {
            'cross_attention': CrossAttention(2, name='cross_attention')(x, y, y_mask),
            'co_attention': CoAttention(2, 32, name='co_attention')(x, y, x_mask, y_mask),
            'concat': ConcatFusion(16, name='concat')(x, y[:, :5]),
            'weighted': WeightedSumFusion(16, name='weighted')(x[:, 0], y[:, 0]),
            'gated': GatedFusion(name='gated')(x[:, 0], d['z']),
            'xattn_fusion': CrossAttentionFusion(2, name='xattn_fusion')(x, y, x_mask, y_mask),
            'gated_xattn_block': GatedCrossAttentionBlock(2, 32, name='gated_xattn_block')(x, y, y_mask),
            'gated_xattn_text': GatedXAttnTextEncoder(VOCAB, LEN, 16, 1, 2, 32, name='gated_xattn_text')(
                text, y, y_mask),
            'classifier': classifier.clone(parent=self, name='classifier')(
                {'image': d['image'], 'text': text, 'text_mask': d['text_mask']}),
            'itm_mlm_heads': ItmMlmHeads(VOCAB + 1, 16, 1, 2, 32, name='itm_mlm_heads')(y, d['t'], d['text_mask']),
            'itm_mlm_model': itm_mlm.clone(parent=self, name='itm_mlm_model')({'image': d['image'], 'text': text}),
        }


def bundle_inputs():
    """Batch B=8, so every batch-sharded layout divides it."""
    batch = image_text_batch()
    return dict(x=normal(1, (B, 5, 16)), y=normal(2, (B, 6, 32)), z=normal(3, (B, 16)), t=normal(4, (B, LEN, 16)),
                x_mask=length_mask([5, 1, 3, 2, 4, 5, 2, 1], 5), y_mask=length_mask([6, 2, 3, 1, 6, 5, 4, 2], 6),
                **batch)


def bundle_apply(v, d):
    # Open the zero-initialised tanh gates so the gated paths are compared too; sample ITM negatives.
    return Bundle().apply(open_gates(v), d, rngs={'itm': jax.random.key(7)})


LAYOUTS = {'data8': dict(data=8, fsdp=1, tensor=1), 'fsdp8': dict(data=1, fsdp=8, tensor=1),
           'mixed': dict(data=2, fsdp=2, tensor=2)}


@pytest.fixture(scope='module')
def single_device():
    """(variables on the host, outputs) of the Bundle on a 1-device mesh."""
    d = bundle_inputs()
    mesh = mmjax.runtime.sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)), jax.devices()[:1])
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        v = jax.jit(Bundle().init)(KEY, d)
        return jax.device_get(v), jax.device_get(jax.jit(bundle_apply)(v, d))


@pytest.mark.skipif(jax.device_count() < 8, reason='needs 8 (virtual) devices')
@pytest.mark.parametrize('layout', list(LAYOUTS))
def test_every_module_same_output_on_one_and_eight_devices(layout, single_device, capfd):
    ref_vars, ref_out = single_device
    d = bundle_inputs()
    mesh = mmjax.runtime.sharding.make_mesh(ml_collections.ConfigDict(LAYOUTS[layout]), jax.devices()[:8])
    abstract = jax.eval_shape(Bundle().init, KEY, d)
    d = jax.device_put(d, NamedSharding(mesh, P(('data', 'fsdp'))))
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, RULES)
        # Params laid out by the logical rules. Compiling a sharded init is the slowest step here, so the init itself
        # is compiled sharded once, on the layout that uses all three mesh axes, and checked against the reference.
        v = jax.jit(lambda v: v, out_shardings=shardings)(ref_vars)
        if layout == 'mixed':
            born_sharded = jax.jit(Bundle().init, out_shardings=shardings)(KEY, d)
            for (path, a), (_, b) in zip(partitioned_leaves(born_sharded), partitioned_leaves(v)):
                assert a.value.sharding == b.value.sharding, path
                np.testing.assert_allclose(a.value, b.value, atol=1e-6, err_msg=jax.tree_util.keystr(path))
        got = jax.jit(bundle_apply)(v, d)
    assert set(got) == set(ref_out) and len(got) == 11
    kernel = v['params']['classifier']['coattn_0']['a_mlp']['mlp']['fc_in']['kernel'].value
    expected = tuple(a if LAYOUTS[layout][a] > 1 else None for a in ('fsdp', 'tensor'))
    assert tuple(s if s is None or mesh.shape[s] > 1 else None for s in kernel.sharding.spec) == expected
    for name in got:
        for g, w in zip(jax.tree_util.tree_leaves(got[name]), jax.tree_util.tree_leaves(ref_out[name])):
            np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-5, err_msg=name)
    assert 'Involuntary full rematerialization' not in capfd.readouterr().err
