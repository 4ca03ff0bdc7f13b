"""Tests for mmjax.models: shapes, masking/pooling semantics, scan/remat equivalence, logical partitioning."""

import functools
import math
import os
import re

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from mmjax.models import Encoder, MultiHeadAttention, TextTransformer, ViT, build_model  # noqa: E402
from mmjax.models.encoders import last_nonpad_index, patchify  # noqa: E402
from mmjax.models.layers import ACTIVATIONS, add_positions, gelu_exact  # noqa: E402

PARAM_AXES = {'embed', 'mlp', 'heads', 'kv', 'vocab', 'patch', 'length', 'joint', 'layers', 'channels'}
DEFAULT_RULES = (
    ('act_batch', ('data', 'fsdp')), ('act_length', None), ('act_embed', None), ('act_mlp', 'tensor'),
    ('act_heads', 'tensor'), ('act_kv', None), ('act_joint', None), ('embed', 'fsdp'), ('mlp', 'tensor'),
    ('heads', 'tensor'), ('kv', None), ('vocab', 'tensor'), ('patch', None), ('length', None), ('joint', None),
    ('layers', None), ('channels', None))
B, IMG, LEN = 4, 16, 16


def tiny_model_config(**overrides) -> ml_collections.ConfigDict:
    """A tiny `config.model` (width 32, depth 2, heads 2, 16x16 images with 4x4 patches, text max_len 16)."""
    cfg = ml_collections.ConfigDict(dict(
        embed_dim=24, dtype='float32', param_dtype='float32', remat='none', scan_layers=False, loss='softmax',
        logit_scale_init=math.log(1 / 0.07), logit_scale_max=math.log(100), logit_bias_init=None,
        image=dict(image_size=IMG, patch_size=4, channels=3, width=32, depth=2, num_heads=2, mlp_dim=64, pool='cls'),
        text=dict(vocab_size=259, max_len=LEN, width=32, depth=2, num_heads=2, mlp_dim=64, causal=True, pool='eot'),
    ))
    cfg.update_from_flattened_dict(overrides)
    return cfg


def make_tokens(lengths, total=LEN, seed=0):
    """int32 [len(lengths), total]: BOS=1, random bytes, EOT=2 at position length-1, pad 0 after."""
    rng = np.random.default_rng(seed)
    out = np.zeros((len(lengths), total), np.int32)
    for i, n in enumerate(lengths):
        out[i, 0] = 1
        out[i, 1:n - 1] = rng.integers(3, 259, n - 2)
        out[i, n - 1] = 2
    return jnp.asarray(out)


def make_batch(seed=0):
    images = jax.random.normal(jax.random.key(seed), (B, IMG, IMG, 3), jnp.float32)
    return {'image': images, 'text': make_tokens([5, 16, 9, 3], seed=seed)}


def init(model, batch, seed=0):
    return jax.jit(model.init)(jax.random.key(seed), batch)


def partitioned_leaves(variables):
    return jax.tree_util.tree_flatten_with_path(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]


@pytest.fixture(scope='module')
def clip():
    model = build_model(tiny_model_config())
    batch = make_batch()
    return model, init(model, batch), batch


# --------------------------------------------------------------------------------------------- model outputs

def test_outputs_shapes_unit_norm_and_scale(clip):
    model, variables, batch = clip
    out = jax.jit(model.apply)(variables, batch)
    assert set(out) == {'embeddings', 'logit_scale'}
    assert set(variables['params']) == {'image', 'text', 'logit_scale'}
    for name in ('image', 'text'):
        emb = out['embeddings'][name]
        assert emb.shape == (B, 24) and emb.dtype == jnp.float32
        np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, rtol=1e-5)
    assert out['logit_scale'].shape == () and out['logit_scale'].dtype == jnp.float32
    np.testing.assert_allclose(out['logit_scale'], 1 / 0.07, rtol=1e-5)
    # Different inputs give different embeddings (the towers are not constant).
    assert not np.allclose(out['embeddings']['image'][0], out['embeddings']['image'][1])
    assert not np.allclose(out['embeddings']['text'][0], out['embeddings']['text'][1])


def test_encode_methods_match_call_and_missing_tower_is_skipped(clip):
    model, variables, batch = clip
    out = jax.jit(model.apply)(variables, batch)
    img = jax.jit(functools.partial(model.apply, method='encode_image'))(variables, batch['image'])
    txt = jax.jit(functools.partial(model.apply, method=model.encode_text))(variables, batch['text'])
    np.testing.assert_allclose(img, out['embeddings']['image'], atol=1e-6)
    np.testing.assert_allclose(txt, out['embeddings']['text'], atol=1e-6)
    only_text = jax.eval_shape(model.apply, variables, {'text': batch['text']})
    assert set(only_text['embeddings']) == {'text'}
    with pytest.raises(ValueError, match='none of the model inputs'):
        jax.eval_shape(model.apply, variables, {'label': jnp.zeros((B,), jnp.int32)})


def scalars(module):
    return module.scale, module.bias


def test_logit_scale_is_clipped_and_bias_optional(clip):
    model, variables, batch = clip
    params = dict(variables['params'])
    params['logit_scale'] = nn.Partitioned(jnp.asarray(math.log(1000.0)), names=())
    scale, bias = model.apply({'params': params}, method=scalars)
    np.testing.assert_allclose(scale, 100.0, rtol=1e-5)
    assert bias is None

    siglip = build_model(tiny_model_config(logit_bias_init=-10.0, logit_scale_init=math.log(10)))
    abstract = jax.eval_shape(siglip.init, jax.random.key(0), batch)
    assert set(abstract['params']) == {'image', 'text', 'logit_scale', 'logit_bias'}
    assert set(jax.eval_shape(siglip.apply, abstract, batch)) == {'embeddings', 'logit_scale', 'logit_bias'}
    scale, bias = siglip.apply(siglip.init(jax.random.key(0), method=scalars), method=scalars)
    np.testing.assert_allclose(bias, -10.0)
    np.testing.assert_allclose(scale, 10.0, rtol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_outputs():
    model = build_model(tiny_model_config(dtype='bfloat16'))
    batch = make_batch()
    v = jax.eval_shape(model.init, jax.random.key(0), batch)
    assert all(leaf.value.dtype == jnp.float32 for _, leaf in partitioned_leaves(v))
    out = jax.eval_shape(model.apply, v, batch)
    assert out['embeddings']['image'].dtype == jnp.float32 and out['logit_scale'].dtype == jnp.float32
    vit = ViT(IMG, 4, 3, 32, 1, 2, 64, dtype=jnp.bfloat16)
    tokens, pooled = jax.eval_shape(vit.apply, jax.eval_shape(vit.init, jax.random.key(0), batch['image']),
                                    batch['image'])
    assert tokens.dtype == jnp.bfloat16 and pooled.dtype == jnp.bfloat16
    txt = text_model(True, 'eot', dtype=jnp.bfloat16)
    tokens, _ = jax.eval_shape(txt.apply, jax.eval_shape(txt.init, jax.random.key(0), batch['text']), batch['text'])
    assert tokens.dtype == jnp.bfloat16


def test_build_model_rejects_unknown_and_missing_keys():
    cfg = tiny_model_config()
    cfg.image.depht = 3
    with pytest.raises(ValueError, match='model.image.depht'):
        build_model(cfg)
    cfg = tiny_model_config()
    del cfg.text['mlp_dim']
    with pytest.raises(ValueError, match=r"model.text is missing keys \['mlp_dim'\]"):
        build_model(cfg)


# --------------------------------------------------------------------------------------------- ViT

def test_patchify_matches_loop():
    x = np.arange(2 * 8 * 8 * 3, dtype=np.float32).reshape(2, 8, 8, 3)
    got = np.asarray(patchify(jnp.asarray(x), 4))
    want = np.stack([np.stack([x[b, i * 4:(i + 1) * 4, j * 4:(j + 1) * 4].reshape(-1)
                               for i in range(2) for j in range(2)]) for b in range(2)])
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize('pool,n_tokens', [('cls', 17), ('mean', 16)])
def test_vit_pooling(pool, n_tokens):
    images = make_batch()['image']
    vit = ViT(IMG, 4, 3, 32, 2, 2, 64, pool=pool)
    tokens, pooled = jax.jit(vit.apply)(jax.jit(vit.init)(jax.random.key(0), images), images)
    assert tokens.shape == (B, n_tokens, 32) and pooled.shape == (B, 32)
    want = tokens[:, 0] if pool == 'cls' else tokens.mean(axis=1)
    np.testing.assert_allclose(pooled, want, atol=1e-6)


# --------------------------------------------------------------------------------------------- text

def text_model(causal, pool, **kw):
    return TextTransformer(259, LEN, 32, 2, 2, 64, causal=causal, pool=pool, **kw)


def test_last_nonpad_index():
    tokens = jnp.asarray([[1, 5, 2, 0, 0], [1, 2, 0, 0, 0], [1, 4, 4, 4, 2]])
    np.testing.assert_array_equal(last_nonpad_index(tokens), [2, 1, 4])


@pytest.mark.parametrize('causal,pool', [(True, 'eot'), (False, 'cls'), (False, 'eot')])
def test_text_pooling_ignores_padding_length(causal, pool):
    """Pooled features sit at the right position and do not depend on how much padding follows."""
    model = text_model(causal, pool)
    tokens = make_tokens([5, 16, 9, 3])
    variables = model.init(jax.random.key(1), tokens)
    feats, pooled = model.apply(variables, tokens)
    index = np.array([4, 15, 8, 2]) if pool == 'eot' else np.zeros(4, int)
    np.testing.assert_allclose(pooled, feats[np.arange(4), index], atol=1e-6)

    short = tokens[jnp.asarray([0, 2, 3]), :10]  # the same rows, less padding
    _, pooled_short = model.apply(variables, short)
    np.testing.assert_allclose(pooled_short, pooled[jnp.asarray([0, 2, 3])], atol=1e-5)


def test_bidirectional_padding_mask_ignores_pad_token_ids():
    model = text_model(causal=False, pool='cls')
    tokens = make_tokens([5, 16, 9, 3])
    valid = tokens != 0
    variables = model.init(jax.random.key(2), tokens)
    feats, pooled = model.apply(variables, tokens, valid)
    junk = jnp.where(valid, tokens, jax.random.randint(jax.random.key(3), tokens.shape, 3, 259))
    feats2, pooled2 = model.apply(variables, junk, valid)
    np.testing.assert_allclose(pooled2, pooled, atol=1e-5)
    np.testing.assert_allclose(jnp.where(valid[..., None], feats2, 0), jnp.where(valid[..., None], feats, 0),
                               atol=1e-5)
    # Without the mask the same junk is attended to and changes the CLS features.
    _, pooled3 = model.apply(variables, junk, jnp.ones_like(valid))
    assert np.abs(pooled3 - pooled)[jnp.asarray([0, 2, 3])].max() > 1e-3


def test_causal_later_tokens_do_not_change_earlier_positions():
    model = text_model(causal=True, pool='eot')
    tokens = make_tokens([16, 16])
    variables = model.init(jax.random.key(4), tokens)
    feats, _ = model.apply(variables, tokens)
    j = 7
    changed = tokens.at[:, j].set((tokens[:, j] + 11 - 3) % 256 + 3)
    feats2, _ = model.apply(variables, changed)
    np.testing.assert_allclose(feats2[:, :j], feats[:, :j], atol=1e-5)
    assert np.abs(feats2[:, j:] - feats[:, j:]).max(axis=-1).min() > 1e-4  # every later position changes


# --------------------------------------------------------------------------------------------- attention

def test_cross_attention_ignores_masked_keys():
    mha = MultiHeadAttention(num_heads=2)
    kq, kk, kc = jax.random.split(jax.random.key(5), 3)
    x_q = jax.random.normal(kq, (2, 3, 32))
    x_kv = jax.random.normal(kk, (2, 6, 24))  # cross inputs may have a different width
    key_valid = jnp.asarray([[1, 1, 1, 0, 0, 0], [1, 0, 1, 0, 1, 1]], bool)
    mask = key_valid[:, None, None, :]
    variables = mha.init(jax.random.key(6), x_q, x_kv, mask)
    out = mha.apply(variables, x_q, x_kv, mask)
    assert out.shape == (2, 3, 32)
    changed_kv = jnp.where(key_valid[..., None], x_kv, jax.random.normal(kc, x_kv.shape) * 5)
    np.testing.assert_allclose(mha.apply(variables, x_q, changed_kv, mask), out, atol=1e-5)
    assert np.abs(mha.apply(variables, x_q, changed_kv, None) - out).max() > 1e-3


def reference_attention(params, x_q, x_kv, mask):
    """Plain NumPy multi-head attention with the module's params."""
    p = jax.tree_util.tree_map(np.asarray, nn.meta.unbox(params))
    q = np.einsum('bqe,ehd->bqhd', x_q, p['query']['kernel']) + p['query']['bias']
    k = np.einsum('bke,ehd->bkhd', x_kv, p['key']['kernel']) + p['key']['bias']
    v = np.einsum('bke,ehd->bkhd', x_kv, p['value']['kernel']) + p['value']['bias']
    logits = np.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(q.shape[-1])
    logits = np.where(mask, logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True)
    o = np.einsum('bhqk,bkhd->bqhd', w, v)
    return np.einsum('bqhd,hde->bqe', o, p['out']['kernel']) + p['out']['bias']


def test_attention_matches_reference_with_per_head_mask():
    mha = MultiHeadAttention(num_heads=2)
    kq, kk, km = jax.random.split(jax.random.key(7), 3)
    x_q = jax.random.normal(kq, (2, 3, 32))
    x_kv = jax.random.normal(kk, (2, 6, 32))
    mask = jax.random.bernoulli(km, 0.5, (2, 2, 3, 6)).at[..., 0].set(True)  # [B,H,Lq,Lk], key 0 always visible
    variables = mha.init(jax.random.key(8), x_q, x_kv, mask)
    out = mha.apply(variables, x_q, x_kv, mask)
    want = reference_attention(variables['params'], np.asarray(x_q), np.asarray(x_kv), np.asarray(mask))
    np.testing.assert_allclose(out, want, atol=1e-5)
    self_out = mha.apply(variables, x_q, None, None)
    no_mask = np.ones((1, 1, 1, 1), bool)
    want_self = reference_attention(variables['params'], np.asarray(x_q), np.asarray(x_q), no_mask)
    np.testing.assert_allclose(self_out, want_self, atol=1e-5)


# --------------------------------------------------------------------------------------------- scan / remat

def stack_layers(params):
    """Converts unrolled 'block_{i}' params to the scanned 'blocks' layout (leading 'layers' axis)."""
    if not isinstance(params, dict):
        return params
    blocks = sorted((k for k in params if k.startswith('block_')), key=lambda k: int(k.split('_')[1]))
    out = {k: stack_layers(v) for k, v in params.items() if k not in blocks}
    if blocks:
        per_layer = [params[k] for k in blocks]
        out['blocks'] = jax.tree_util.tree_map(
            lambda *xs: nn.Partitioned(jnp.stack([x.value for x in xs]), names=('layers',) + xs[0].names),
            *per_layer, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    return out


def test_scan_layers_matches_unrolled(clip):
    model, variables, batch = clip
    scanned = build_model(tiny_model_config(scan_layers=True))
    scanned_vars = init(scanned, batch)
    converted = {'params': stack_layers(variables['params'])}
    is_box = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
    assert (jax.tree_util.tree_structure(converted, is_leaf=is_box)
            == jax.tree_util.tree_structure(scanned_vars, is_leaf=is_box))
    for (pa, a), (pb, b) in zip(partitioned_leaves(converted), partitioned_leaves(scanned_vars)):
        assert pa == pb and a.value.shape == b.value.shape and a.names == b.names, (pa, pb)
    ref = model.apply(variables, batch)
    out = jax.jit(scanned.apply)(converted, batch)
    for name in ('image', 'text'):
        np.testing.assert_allclose(out['embeddings'][name], ref['embeddings'][name], atol=1e-5)


@pytest.mark.parametrize('remat,scan', [('dots', False), ('full', True)])
def test_remat_matches_plain_outputs_and_grads(remat, scan):
    x = jax.random.normal(jax.random.key(9), (2, 8, 32))
    mask = jnp.tril(jnp.ones((8, 8), bool))[None, None]
    plain = Encoder(depth=2, num_heads=2, mlp_dim=64, scan=scan)
    rematted = Encoder(depth=2, num_heads=2, mlp_dim=64, scan=scan, remat=remat)
    params = plain.init(jax.random.key(10), x, mask)['params']

    def loss(m, params, x):
        return jnp.sum(jnp.sin(m.apply({'params': params}, x, mask)))

    (l0, g0) = jax.jit(jax.value_and_grad(lambda p, x: loss(plain, p, x), argnums=(0, 1)))(params, x)
    (l1, g1) = jax.jit(jax.value_and_grad(lambda p, x: loss(rematted, p, x), argnums=(0, 1)))(params, x)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    flat0, flat1 = jax.tree_util.tree_leaves(nn.meta.unbox(g0)), jax.tree_util.tree_leaves(nn.meta.unbox(g1))
    assert len(flat0) == len(flat1) == 2 * 16 // (2 if scan else 1) + 1
    assert min(float(jnp.abs(g).max()) for g in flat0) > 0
    for a, b in zip(flat0, flat1):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5)
    # The rematted function really recomputes: its jaxpr holds a checkpoint (remat) primitive.
    jaxpr = jax.make_jaxpr(jax.grad(lambda p: loss(rematted, p, x)))(params)
    assert 'checkpoint' in str(jaxpr) or 'remat' in str(jaxpr)



def _pooled_loss(module, params, x, return_tokens, **kw):
    _, pooled = module.apply({'params': params}, x, return_tokens=return_tokens, **kw)
    return jnp.sum(jnp.sin(pooled) * jnp.linspace(0.5, 1.5, pooled.shape[-1]))


@pytest.mark.parametrize('tower,scan,remat', [
    ('vit', False, 'none'), ('vit', True, 'dots'), ('vit_prompts', True, 'none'), ('vit_mean', False, 'none'),
    ('text_eot', False, 'none'), ('text_eot', True, 'full'), ('text_eot_prompts_lora', False, 'dots'),
    ('text_cls', True, 'none')])
def test_pooled_only_towers_equal_the_full_pass_and_its_gradients(tower, scan, remat):
    """return_tokens=False (what contrastive training and encode_* run) computes only the pooled token in the
    last block; the pooled features and every parameter gradient equal the full pass's."""
    kw = dict(scan_layers=scan, remat=remat)
    if tower.startswith('vit'):
        model = ViT(IMG, 4, 3, 32, 3, 2, 64, pool='mean' if tower == 'vit_mean' else 'cls',
                    num_prompts=2 if 'prompts' in tower else 0, adapter_dim=8, **kw)
        x = make_batch()['image']
    else:
        model = TextTransformer(259, LEN, 32, 3, 2, 64, causal=tower.startswith('text_eot'),
                                pool=tower.split('_')[1], num_prompts=3 if 'prompts' in tower else 0,
                                lora_rank=4 if 'lora' in tower else 0, lora_targets='.*', **kw)
        x = make_tokens([5, 16, 9, 3])
    params = model.init(jax.random.key(3), x)['params']
    params = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(4), a.shape),
                          nn.meta.unbox(params))  # non-zero adapters / LoRA B, so every path is exercised
    tokens, pooled = model.apply({'params': params}, x, return_tokens=False)
    assert tokens is None
    _, want = model.apply({'params': params}, x)
    np.testing.assert_allclose(pooled, want, atol=2e-6)
    grad = jax.jit(jax.grad(_pooled_loss, argnums=1), static_argnums=(0, 3))
    g_pooled, g_full = grad(model, params, x, False), grad(model, params, x, True)
    flat_full = jax.tree_util.tree_leaves_with_path(g_full)
    assert min(float(jnp.abs(g).max()) for _, g in flat_full) > 0
    for (path, a), b in zip(flat_full, jax.tree_util.tree_leaves(g_pooled)):
        scale = max(1.0, float(jnp.abs(a).max()))  # summation order differs: compare against the leaf's scale
        np.testing.assert_allclose(b, a, atol=1e-5 * scale, rtol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_pooled_only_contrastive_forward_does_less_work():
    """The contrastive model's forward (pooled features only) compiles to fewer FLOPs than the same towers
    returning their tokens, by about the last block's work on the non-pooled tokens."""
    model = build_model(tiny_model_config(**{'image.depth': 2, 'text.depth': 2}))
    batch = make_batch()
    params = jax.jit(model.init)(jax.random.key(0), batch)['params']

    def flops(return_tokens):
        def embeddings(p):
            outputs = model.apply({'params': p}, batch, return_tokens, method='tower_outputs')
            return {name: out['embedding'] for name, out in outputs.items()}

        cost = jax.jit(embeddings).lower(params).compile().cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)['flops']

    full, pooled = flops(True), flops(False)
    assert pooled < 0.8 * full, (pooled, full)


def test_invalid_remat_is_rejected():
    x = jnp.zeros((1, 4, 32))
    with pytest.raises(ValueError, match='model.remat'):
        Encoder(depth=1, num_heads=2, mlp_dim=64, remat='some').init(jax.random.key(0), x)


# --------------------------------------------------------------------------------------------- partitioning

@pytest.mark.parametrize('scan', [False, True])
def test_every_param_is_logically_partitioned(clip, scan):
    _, variables, batch = clip
    if scan:
        variables = jax.eval_shape(build_model(tiny_model_config(scan_layers=True)).init, jax.random.key(0), batch)
    leaves = partitioned_leaves(variables)
    assert len(leaves) == len(jax.tree_util.tree_leaves(variables))
    for path, leaf in leaves:
        assert isinstance(leaf, nn.Partitioned), path
        assert len(leaf.names) == leaf.value.ndim, (path, leaf.names)
        assert set(leaf.names) <= PARAM_AXES, (path, leaf.names)
        in_stack = any(getattr(k, 'key', None) == 'blocks' for k in path)
        assert (leaf.names[:1] == ('layers',)) == in_stack, (path, leaf.names)
    by_path = {jax.tree_util.keystr(p): leaf.names for p, leaf in leaves}
    assert by_path["['params']['logit_scale']"] == ()
    assert by_path["['params']['text']['encoder']['token_embed']['embedding']"] == ('vocab', 'embed')
    assert by_path["['params']['image']['head']['kernel']"] == ('embed', 'joint')
    assert by_path["['params']['image']['encoder']['patch_embed']['kernel']"] == ('patch', 'embed')


@pytest.mark.skipif(jax.device_count() < 8, reason='needs 8 (virtual) devices')
def test_sharded_init_and_grad_match_single_device(clip, capfd):
    model, variables, batch = clip
    mesh = jax.make_mesh((2, 2, 2), ('data', 'fsdp', 'tensor'), devices=jax.devices()[:8],
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    abstract = jax.eval_shape(model.init, jax.random.key(0), batch)

    def loss(params):
        out = model.apply({'params': params}, batch)
        return jnp.sum(out['embeddings']['image'] * out['embeddings']['text']), out

    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, DEFAULT_RULES)
        sharded_vars = jax.jit(model.init, out_shardings=shardings)(jax.random.key(0), batch)
        (value, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(sharded_vars['params'])
    kernel = sharded_vars['params']['image']['encoder']['transformer']['block_0']['mlp']['fc_in']['kernel'].value
    assert kernel.sharding.spec == jax.sharding.PartitionSpec('fsdp', 'tensor')
    table_grad = grads['text']['encoder']['token_embed']['embedding'].value
    assert table_grad.sharding.spec == jax.sharding.PartitionSpec('tensor', 'fsdp')
    ref = model.apply(variables, batch)
    for name in ('image', 'text'):
        np.testing.assert_allclose(out['embeddings'][name], ref['embeddings'][name], atol=1e-5)
    np.testing.assert_allclose(value, jnp.sum(ref['embeddings']['image'] * ref['embeddings']['text']), rtol=1e-5)
    # The logical layout is one XLA can follow without replicating whole activations.
    assert 'Involuntary full rematerialization' not in capfd.readouterr().err


@pytest.mark.parametrize("masked", [False, True])
def test_dot_product_attention_path_equals_einsum_path(masked):
    """`jax.nn.dot_product_attention` (chosen on GPUs) computes the same attention as the einsum path."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 7, 32)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(3, 5, 32)), jnp.float32)
    mask = jnp.asarray(rng.random((3, 1, 1, 5)) > 0.3).at[:, :, :, 0].set(True) if masked else None
    einsum = MultiHeadAttention(4, implementation="einsum")
    params = einsum.init(jax.random.key(0), x, y, mask)
    fused = MultiHeadAttention(4, implementation="dot_product")
    np.testing.assert_allclose(fused.apply(params, x, y, mask), einsum.apply(params, x, y, mask),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_add_positions_equals_broadcast_add_values_and_gradients(dtype):
    """`add_positions` (position embeddings with a dot-product gradient) is `x + pos[None]`: value, gradient of
    both inputs and their dtypes, also with the batch split over 8 devices (the gradient of pos is summed
    across them)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(8, 5, 6)), dtype)
    pos = jnp.asarray(rng.normal(size=(5, 6)), dtype)
    w = jnp.asarray(rng.normal(size=(8, 5, 6)), dtype)  # a non-uniform incoming gradient

    def loss(add):
        return lambda x, pos: jnp.sum((add(x, pos) * w).astype(jnp.float32) ** 2)

    tol = dict(rtol=1e-6, atol=1e-6) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2)
    reference = jax.grad(loss(lambda x, pos: x + pos[None]), argnums=(0, 1))(x, pos)
    np.testing.assert_array_equal(add_positions(x, pos), x + pos[None])
    mesh = jax.make_mesh((8,), ('data',))
    sharded_x = jax.device_put(x, NamedSharding(mesh, P('data')))
    for args in ((x, pos), (sharded_x, pos)):
        grads = jax.jit(jax.grad(loss(add_positions), argnums=(0, 1)))(*args)
        for got, want in zip(grads, reference):
            assert got.dtype == want.dtype == dtype
            np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **tol)


def test_exact_gelu_and_its_gradient_equal_jax_nn_gelu():
    """mmjax's exact GELU (erf form, custom gradient) is jax.nn.gelu(approximate=False), values and gradient,
    over the range activations reach, in float32 and bfloat16. Absolute tolerance 1e-6: like torch's formula,
    1 + erf(x) cancels in the far negative tail, where GELU itself is below 1e-4."""
    assert ACTIVATIONS['gelu'] is gelu_exact
    x = jnp.concatenate([jnp.linspace(-12.0, 12.0, 4001), jnp.asarray([-40.0, -0.0, 1e-7, 40.0])])
    reference = functools.partial(jax.nn.gelu, approximate=False)
    np.testing.assert_allclose(gelu_exact(x), reference(x), rtol=2e-6, atol=1e-6)
    grad = jax.vmap(jax.grad(gelu_exact))(x)
    np.testing.assert_allclose(grad, jax.vmap(jax.grad(reference))(x), rtol=2e-6, atol=1e-6)
    assert np.all(np.isfinite(grad)) and grad[-4] == 0.0 and grad[-1] == 1.0  # x = -40, 40
    xb = x.astype(jnp.bfloat16)
    assert gelu_exact(xb).dtype == jnp.bfloat16 and jax.grad(lambda v: gelu_exact(v).sum())(xb).dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(gelu_exact(xb), np.float32), np.asarray(reference(xb), np.float32),
                               rtol=1e-2, atol=1e-2)


def test_exact_gelu_backward_recomputes_erf_instead_of_reading_a_saved_copy():
    """In a compiled MLP forward + backward the backward computes its own erf: the program holds two erf ops.
    With one (XLA merging the backward's erf into the forward's), the forward writes erf's [B, L, mlp_dim]
    output out as an extra pass for the backward to read."""
    def loss(w_in, b_in, w_out, x):
        return jnp.sum(gelu_exact(x @ w_in + b_in) @ w_out)

    args = (jnp.ones((16, 64)), jnp.zeros(64), jnp.ones((64, 16)), jnp.ones((128, 16)))
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile().as_text()
    assert len(re.findall(r'= f32\[[0-9,]*\]\S* erf\(', hlo)) == 2
