"""open_clip CoCa -> an mmjax task 'coca' workdir (`mmjax.models.coca`), for `mmjax convert open_clip` on a config
with a 'multimodal_cfg' (coca_ViT-B-32, coca_ViT-L-14, ...).

    convert(model_config, checkpoint, workdir)    # CoCa configs here, every other one to open_clip.convert_open_clip

The towers' config is `open_clip.config_from_open_clip` of the config without its CoCa keys (every check of a
CLIP applies); the CoCa section comes from 'multimodal_cfg' and the vision pooler. Weight mapping, beyond the
CLIP towers' (`open_clip._block`, `_ln`, `_token_table`):
  - visual: the ViT's own final LayerNorm is the identity (scale 1, bias 0): open_clip pools the transformer's
    output directly; its 'attn_pool' becomes 'pooler' (query [Q,D], ln_q, ln_k, attention with q/k/v split),
    'ln_post' becomes 'ln_pooled' and 'proj' 'image_proj'. The first query is the contrastive one.
  - text: 'cls_emb' -> 'text/cls', positional_embedding [L+1, W], 'ln_final' (applied to the CLS only).
  - text_decoder: open_clip's layer i is a causal block (resblocks.i) then a cross-attention block
    (cross_attn.i: ln_1 on the text, ln_1_kv on the image tokens, attention, ln_2 + MLP). They become mmjax blocks
    2i (no cross-attention) and 2i+1 (cross_attention_every=2) whose self-attention is zero (q/k/v/out kernels
    and biases 0: it adds exactly 0); ln_1_kv's scale and bias are folded into that block's key/value
    projections (the model feeds them the image tokens normalised without an affine, 'media_norm').
    'ln_final' -> 'ln_decoder', 'text_projection' [W,V] -> 'logits' (re-ordered as the token table).
Refused: CoCa variants the model cannot express ('parallel' / 'cascade' attentional pools, multimodal widths other
than the text width, a pooler width other than embed_dim), each named by its key.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.interop import open_clip as oc_lib
from mmjax.interop.open_clip import ConversionError
from mmjax.models.encoders import VOCAB_MULTIPLE
from mmjax.models.layers import strip_boxes
from mmjax.tasks import dummy_batch, get_task

# open_clip keys of a CoCa config that the towers' CLIP conversion does not read.
_VISION_COCA = ('attentional_pool', 'attn_pooler_queries', 'attn_pooler_heads')
_TEXT_COCA = ('embed_cls',)


def is_coca(oc: dict) -> bool:
    """Whether an open_clip model config is a CoCa (it has a 'multimodal_cfg')."""
    return 'multimodal_cfg' in oc


def config_from_open_clip_coca(oc: dict, **kwargs):
    """An open_clip CoCa model config -> a locked mmjax task 'coca' config (keyword arguments as
    `open_clip.config_from_open_clip`). ConversionError names every option the model cannot express."""
    vis, txt, mm = dict(oc.get('vision_cfg') or {}), dict(oc.get('text_cfg') or {}), dict(oc['multimodal_cfg'])
    problems = []
    if vis.get('attentional_pool') is not True:
        problems.append(f"vision_cfg.attentional_pool={vis.get('attentional_pool')!r}: mmjax CoCa is open_clip's "
                        f"original pooler (true); 'parallel' / 'cascade' are not supported")
    if txt.get('embed_cls') is not True:
        problems.append(f"text_cfg.embed_cls={txt.get('embed_cls')!r}: CoCa's text tower appends a CLS (true)")
    width = int(txt.get('width', 512))
    for key, want in (('width', width), ('vocab_size', int(txt.get('vocab_size', 49408)))):
        if int(mm.get(key, want)) != want:
            problems.append(f'multimodal_cfg.{key}={mm[key]} differs from text_cfg.{key}={want}')
    if int(oc.get('embed_dim', 0)) != width:
        problems.append(f"embed_dim={oc.get('embed_dim')} differs from the text width {width}: the pooled image "
                        f"tokens feed the multimodal layers")
    for key in set(mm) - {'context_length', 'vocab_size', 'width', 'heads', 'layers', 'mlp_ratio',
                          'attn_pooler_heads', 'n_queries', 'dim_head'}:
        if mm[key] not in (None, False):
            problems.append(f'multimodal_cfg.{key}={mm[key]!r} is an option this converter does not know')
    if problems:
        raise ConversionError('the open_clip CoCa model cannot be converted exactly:\n  - ' + '\n  - '.join(problems))
    towers = {k: v for k, v in oc.items() if k != 'multimodal_cfg'}
    towers['vision_cfg'] = {k: v for k, v in vis.items() if k not in _VISION_COCA}
    towers['text_cfg'] = {k: v for k, v in txt.items() if k not in _TEXT_COCA}
    config = oc_lib.config_from_open_clip(towers, **kwargs)
    config.unlock()
    config.task = 'coca'
    heads = int(mm.get('heads', 8))
    config.model.coca.update(
        caption_queries=int(vis.get('attn_pooler_queries', 256)) - 1, pooler_width=int(oc['embed_dim']),
        pooler_heads=int(vis.get('attn_pooler_heads', 8)), decoder_depth=2 * int(mm.get('layers', 12)),
        decoder_heads=heads, decoder_mlp_dim=int(width * float(mm.get('mlp_ratio', 4.0))), cross_attention_every=2)
    config.model.scan_layers = False  # the decoder's cache needs unrolled blocks
    config.lock()
    return config


def _attention(sd: dict, p: str, heads: int) -> dict[str, Any]:
    """A torch MultiheadAttention under prefix `p` (fused in_proj or separate q/k/v weights) -> mmjax
    MultiHeadAttention params (kernels [E_in,H,K], out [H,K,E])."""
    if p + 'in_proj_weight' in sd:
        w = np.split(sd[p + 'in_proj_weight'], 3)
    else:
        w = [sd[p + f'{n}_proj_weight'] for n in ('q', 'k', 'v')]
    b = np.split(sd[p + 'in_proj_bias'], 3)
    dim = w[0].shape[0]
    k = dim // heads
    out = {name: {'kernel': oc_lib._t(w[i]).reshape(-1, heads, k), 'bias': b[i].reshape(heads, k)}
           for i, name in enumerate(('query', 'key', 'value'))}
    out['out'] = {'kernel': oc_lib._t(sd[p + 'out_proj.weight']).reshape(heads, k, dim),
                  'bias': sd[p + 'out_proj.bias']}
    return out


def _cross_block(sd: dict, p: str, heads: int) -> dict[str, Any]:
    """open_clip cross-attention block (prefix `p`) -> an mmjax EncoderBlock with cross-attention whose
    self-attention adds 0 and whose key/value projections absorb ln_1_kv's affine."""
    block = oc_lib._block(sd, p, heads)
    xattn = block['attn']
    g, b = sd[p + 'ln_1_kv.weight'], sd[p + 'ln_1_kv.bias']
    for name in ('key', 'value'):
        kernel = xattn[name]['kernel']  # [E, H, K]: (n * g + b) @ W + c = n @ (g W) + (b @ W + c)
        xattn[name] = {'kernel': g[:, None, None] * kernel,
                       'bias': xattn[name]['bias'] + np.einsum('e,ehk->hk', b, kernel)}
    zero = jax.tree.map(np.zeros_like, block['attn'])
    width = g.shape[0]
    return {'ln_attn': {'scale': np.ones(width, np.float32), 'bias': np.zeros(width, np.float32)}, 'attn': zero,
            'ln_xattn': block['ln_attn'], 'xattn': xattn, 'ln_mlp': block['ln_mlp'], 'mlp': block['mlp']}


def _image_params(sd: dict, m) -> dict[str, Any]:
    conv = sd['visual.conv1.weight']  # [W, C, p, p] -> [(py, px, c), W]
    width = conv.shape[0]
    return {
        'patch_embed': {'kernel': np.ascontiguousarray(conv.transpose(2, 3, 1, 0).reshape(-1, width)),
                        'bias': np.zeros((width,), np.float32)},
        'cls': sd['visual.class_embedding'], 'pos_embed': sd['visual.positional_embedding'],
        'ln_pre': oc_lib._ln(sd, 'visual.ln_pre'),
        'transformer': oc_lib._transformer(sd, 'visual.', m.image.depth, m.image.num_heads, False),
        'ln_final': {'scale': np.ones(width, np.float32), 'bias': np.zeros(width, np.float32)}}


def convert_coca_state_dict(sd: dict[str, np.ndarray], config, text_ids: str = 'raw') -> dict[str, Any]:
    """open_clip CoCa state dict (numpy) -> mmjax CocaModel params for `config`; ConversionError on missing,
    unused or mis-shaped tensors."""
    sd = {k[len('module.'):] if k.startswith('module.') else k: np.asarray(v, np.float32) for k, v in sd.items()}
    used = set()
    tracked = _Tracked(sd, used)
    m, c = config.model, config.model.coca
    rows = -(-m.text.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    try:
        text = {'token_embed': {'embedding': oc_lib._token_table(tracked['text.token_embedding.weight'], rows,
                                                                 text_ids)},
                'pos_embed': tracked['text.positional_embedding'], 'cls': tracked['text.cls_emb'],
                'transformer': oc_lib._transformer(tracked, 'text.', m.text.depth, m.text.num_heads, False),
                'ln_final': oc_lib._ln(tracked, 'text.ln_final')}
        decoder = {}
        for i in range(int(c.decoder_depth) // 2):
            decoder[f'block_{2 * i}'] = oc_lib._block(tracked, f'text_decoder.resblocks.{i}.', c.decoder_heads)
            decoder[f'block_{2 * i + 1}'] = _cross_block(tracked, f'text_decoder.cross_attn.{i}.', c.decoder_heads)
        logits = oc_lib._token_table(tracked['text_decoder.text_projection'].T, rows, text_ids).T
        params = {
            'visual': _image_params(tracked, m),
            'pooler': {'query': tracked['visual.attn_pool.query'], 'ln_q': oc_lib._ln(tracked, 'visual.attn_pool.ln_q'),
                       'ln_k': oc_lib._ln(tracked, 'visual.attn_pool.ln_k'),
                       'attn': _attention(tracked, 'visual.attn_pool.attn.', c.pooler_heads)},
            'ln_pooled': oc_lib._ln(tracked, 'visual.ln_post'), 'image_proj': {'kernel': tracked['visual.proj']},
            'text': text, 'text_proj': {'kernel': tracked['text.text_projection']}, 'decoder': decoder,
            'ln_decoder': oc_lib._ln(tracked, 'text_decoder.ln_final'),
            'logits': {'kernel': np.ascontiguousarray(logits)}, 'logit_scale': tracked['logit_scale'].reshape(())}
    except KeyError as error:
        raise ConversionError(f'the state dict does not match the open_clip CoCa config: missing {error}') from None
    unused = sorted(set(sd) - used - {'text.attn_mask', 'text_decoder.attn_mask'})
    if unused:
        raise ConversionError(f'the state dict has {len(unused)} tensors the CoCa config does not use: '
                              f'{", ".join(unused[:8])}')
    _check_shapes(params, config)
    return params


class _Tracked(dict):
    """The state dict, recording which keys were read."""

    def __init__(self, sd: dict, used: set):
        super().__init__(sd)
        self.used = used

    def __getitem__(self, key):
        self.used.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        return super().__contains__(key)


def _check_shapes(params: dict, config) -> None:
    model = get_task(config).build_model(config.model)
    batch = {k: jnp.zeros(v.shape, v.dtype) for k, v in dummy_batch(config, 1).items()}
    want = oc_lib._flat(strip_boxes(jax.eval_shape(lambda r: model.init(r, batch)['params'], jax.random.key(0))))
    got = oc_lib._flat(params)
    problems = [f'mmjax param {k} has no open_clip source' for k in sorted(set(want) - set(got))]
    problems += [f'converted {k} has no mmjax param' for k in sorted(set(got) - set(want))]
    problems += [f'{k}: converted {tuple(got[k].shape)} vs mmjax {tuple(want[k].shape)}'
                 for k in sorted(set(want) & set(got)) if tuple(got[k].shape) != tuple(want[k].shape)]
    if problems:
        raise ConversionError(f'converted CoCa weights do not fit the mmjax model ({len(problems)} problem(s)):\n  '
                              + '\n  '.join(problems[:20]))


def convert(model_config: str, checkpoint: str, workdir: str, **kwargs) -> dict[str, Any]:
    """`mmjax convert open_clip`: a CoCa config converts here, any other through `open_clip.convert_open_clip`
    (keyword arguments as that function's)."""
    oc, _ = oc_lib.read_model_config(model_config)
    family = (config_from_open_clip_coca, convert_coca_state_dict) if is_coca(oc) else None
    return oc_lib.convert_open_clip(model_config, checkpoint, workdir, family=family, **kwargs)
