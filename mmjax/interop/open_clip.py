"""open_clip / OpenAI CLIP weights -> an mmjax workdir (`mmjax convert open_clip ...`).

    mmjax convert open_clip --model-config ViT-B-32-quickgelu --checkpoint open_clip_model.safetensors \
        --workdir W
    model = mmjax.load("W")     # encode_image / encode_text (CLIP BPE) / logit_scale

Steps: `config_from_open_clip` (open_clip model config dict -> mmjax config, refusing what the mmjax model
cannot express), `convert_state_dict` (open_clip state dict -> mmjax params, checked against the model's
abstract parameter tree), `write_workdir` (a step-0 TrainState checkpoint plus W/config.json, as `mmjax train`
writes them, so `mmjax.load` and `mmjax eval` read it).

Layout differences handled here: the ViT patch conv [W,C,p,p] becomes a Dense kernel over patches flattened
as (py, px, c) (`mmjax.models.encoders.patchify`) with a zero bias; the fused attention `in_proj` [3E,E] is
split into query/key/value kernels [E,H,K] and biases [H,K]; `out_proj` becomes [H,K,E]; torch Linear
weights [out,in] are transposed; the token table is zero-padded to a multiple of 128 rows.

Text ids. open_clip pools the text at argmax(token id) (its EOT is the largest id) and does not mask pads;
mmjax pools at the last non-pad token (pad id 0) and masks pad keys. With the causal mask both read the same
features for any input [SOT, ids..., EOT, 0, ...] (what both tokenizers produce). They differ for inputs
with tokens after EOT, or an EOT that is not the largest id (open_clip's choice) / not the last non-pad.
Two id layouts (`text_ids`):
  'clip_bpe' (default when the config names no HF tokenizer): the table is re-ordered to mmjax's CLIP BPE
     ids (pad 0, SOT 1, EOT 2, open_clip id v -> v + 3), and W gets the merges file, so
     `mmjax.load(W).encode_text(["a photo of a cat"])` tokenizes as open_clip does (without ftfy).
  'raw': open_clip's ids are kept; feed open_clip token ids to `model.apply` / `encode_text` of the module.
     The workdir's text tokenizer is then mmjax's byte tokenizer, whose ids mean nothing to this model.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mmjax import config as config_lib
from mmjax import storage
from mmjax.errors import MmjaxError
from mmjax.interop.torch_files import load_state_dict
from mmjax.models import build_model
from mmjax.models.encoders import VOCAB_MULTIPLE
from mmjax.models.layers import strip_boxes
from mmjax.runtime import sharding as shd
from mmjax.tasks import dummy_batch
from mmjax.training.checkpoint import Checkpointer
from mmjax.training.loop import config_to_json, write_config_json
from mmjax.training.state import StateFactory, TrainState

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
BPE_FILE = 'bpe_simple_vocab_16e6.txt.gz'  # open_clip's bundled CLIP merges
BYTE_SYMBOLS = 512  # CLIP BPE: 256 byte symbols + the same with '</w>', then one token per merge
TEXT_IDS = ('clip_bpe', 'raw')


class ConversionError(MmjaxError, ValueError):
    """The checkpoint or its config cannot be converted exactly; the message names the key."""


# ------------------------------------------------------------------------------------------------ the config

# open_clip config keys that change nothing at inference, or that this converter reads itself.
_TOP_KEYS = {'embed_dim', 'vision_cfg', 'text_cfg', 'quick_gelu', 'custom_text', 'init_logit_scale',
             'init_logit_bias', 'cast_dtype'}
# (key, the only value mmjax can express). Anything else is refused naming the key.
_VISION_FIXED = {
    'ls_init_value': None, 'attentional_pool': False, 'no_ln_pre': False, 'pos_embed_type': 'learnable',
    'final_ln_after_pool': False, 'pool_type': 'tok', 'act_kwargs': None, 'block_type': None, 'qk_norm': False,
    'scaled_cosine_attn': False, 'scale_heads': False, 'scale_attn_inner': False, 'scale_attn': False,
    'scale_fc': False, 'timm_model_name': None, 'input_patchnorm': False,
}
_VISION_FREE = {'layers', 'width', 'head_width', 'mlp_ratio', 'patch_size', 'image_size', 'norm_kwargs',
                'output_tokens', 'patch_dropout',  # training-time only
                'attn_pooler_queries', 'attn_pooler_heads', 'timm_model_pretrained', 'timm_pool', 'timm_proj',
                'timm_proj_bias', 'timm_drop', 'timm_drop_path'}  # unused without attentional_pool / timm
_TEXT_FIXED = {
    'ls_init_value': None, 'embed_cls': False, 'pad_id': 0, 'no_causal_mask': False, 'final_ln_after_pool': False,
    'pool_type': 'argmax', 'proj_bias': False, 'proj_type': 'linear', 'act_kwargs': None, 'block_type': None,
    'qk_norm': False, 'scaled_cosine_attn': False, 'scale_heads': False, 'scale_attn_inner': False,
    'scale_attn': False, 'scale_fc': False, 'hf_model_name': None,
}
_TEXT_FREE = {'context_length', 'vocab_size', 'width', 'heads', 'layers', 'mlp_ratio', 'norm_kwargs',
              'output_tokens', 'eos_id',  # eos_id: read only by pool_type 'eos'
              'hf_tokenizer_name', 'tokenizer_mode', 'tokenizer_kwargs',  # tokenization, not weights
              'hf_model_pretrained', 'hf_proj_type', 'hf_pooler_type'}  # unused without hf_model_name


def _square(value, key: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ConversionError(f'{key}={value!r}: mmjax supports square images and patches only')
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConversionError(f'{key}={value!r}: expected a positive integer')
    return value


def _check_section(cfg: dict, fixed: dict, free: set, where: str, problems: list[str]) -> None:
    for key, value in cfg.items():
        if key in fixed:
            want = fixed[key]
            if value == want or (want in (None, False) and value in (None, False, {})) or \
                    (key == 'block_type' and value == 'default'):
                continue
            problems.append(f'{where}.{key}={value!r} is not supported by the mmjax model (needs {want!r})')
        elif key not in free:
            problems.append(f'{where}.{key} is an open_clip option this converter does not know')
    norm = cfg.get('norm_kwargs') or {}
    if set(norm) - {'eps'} or float(norm.get('eps', 1e-5)) != 1e-5:
        problems.append(f'{where}.norm_kwargs={norm!r} is not supported (mmjax LayerNorm: eps 1e-5)')


def _heads(width: int, heads: int, where: str, problems: list[str]) -> int:
    if heads <= 0 or width % heads:
        problems.append(f'{where}: width {width} is not divisible into {heads} heads')
    return heads


def config_from_open_clip(oc: dict, *, text_ids: str = 'raw', tokenizer_path: str = '',
                          image_mean=OPENAI_MEAN, image_std=OPENAI_STD, scan_layers: bool = False):
    """An open_clip model config (the JSON of `open_clip/model_configs/*.json`) -> a locked mmjax config.

    Raises ConversionError listing every option the mmjax ContrastiveModel cannot express, each by its key.
    text_ids 'clip_bpe' sets the 'clip_bpe' tokenizer reading `tokenizer_path` (and vocab_size + 1: the pad
    row); 'raw' keeps open_clip's ids and the byte tokenizer.
    """
    if text_ids not in TEXT_IDS:
        raise ConversionError(f'text_ids={text_ids!r}; choose one of {TEXT_IDS}')
    problems = [f'{key} is an open_clip option this converter does not know (multimodal / CoCa / HF '
                f'towers are not supported)' for key in sorted(set(oc) - _TOP_KEYS)]
    vis, txt = dict(oc.get('vision_cfg') or {}), dict(oc.get('text_cfg') or {})
    for key in ('embed_dim', 'vision_cfg', 'text_cfg'):
        if key not in oc:
            problems.append(f'{key} is missing from the open_clip config')
    _check_section(vis, _VISION_FIXED, _VISION_FREE, 'vision_cfg', problems)
    _check_section(txt, _TEXT_FIXED, _TEXT_FREE, 'text_cfg', problems)
    layers = vis.get('layers', 12)
    if not isinstance(layers, int):
        problems.append(f'vision_cfg.layers={layers!r}: a ResNet tower (layers per stage) is not supported')
        raise ConversionError('the open_clip model cannot be converted exactly:\n  - ' + '\n  - '.join(problems))
    try:
        image_size = _square(vis.get('image_size', 224), 'vision_cfg.image_size')
        patch_size = _square(vis.get('patch_size', 16), 'vision_cfg.patch_size')
    except ConversionError as e:
        problems.append(str(e))
        image_size = patch_size = 1
    if image_size % patch_size:
        problems.append(f'vision_cfg.image_size={image_size} is not divisible by patch_size={patch_size}')
    v_width = int(vis.get('width', 768))
    head_width = int(vis.get('head_width', 64))
    if head_width <= 0 or v_width % head_width:
        problems.append(f'vision_cfg.width={v_width} is not divisible by head_width={head_width}')
    v_heads = _heads(v_width, v_width // max(head_width, 1), 'vision_cfg', problems)
    t_width = int(txt.get('width', 512))
    t_heads = _heads(t_width, int(txt.get('heads', 8)), 'text_cfg', problems)
    vocab = int(txt.get('vocab_size', 49408))
    if text_ids == 'clip_bpe':
        if txt.get('hf_tokenizer_name'):
            problems.append(f"text_cfg.hf_tokenizer_name={txt['hf_tokenizer_name']!r}: an HF tokenizer's ids "
                            f"cannot be mapped to CLIP BPE ids; use text_ids 'raw'")
        if vocab <= BYTE_SYMBOLS + 2:
            problems.append(f'text_cfg.vocab_size={vocab} is too small for a CLIP BPE vocabulary '
                            f'({BYTE_SYMBOLS} byte symbols + merges + SOT + EOT)')
    elif vocab < 259:
        problems.append(f"text_cfg.vocab_size={vocab} < 259: with text_ids 'raw' the workdir's byte tokenizer "
                        f"does not fit; use text_ids 'clip_bpe'")
    if problems:
        raise ConversionError('the open_clip model cannot be converted exactly:\n  - ' + '\n  - '.join(problems))

    c = config_lib.base_config()
    m = c.model
    m.embed_dim = int(oc['embed_dim'])
    m.activation = 'quick_gelu' if oc.get('quick_gelu', False) else 'gelu'
    m.dtype = m.param_dtype = 'float32'
    m.scan_layers = bool(scan_layers)
    m.logit_scale_init = float(oc.get('init_logit_scale', math.log(1 / 0.07)))
    if oc.get('init_logit_bias') is not None:
        m.logit_bias_init = float(oc['init_logit_bias'])
        m.loss = 'sigmoid'
    m.image.update(image_size=image_size, patch_size=patch_size, channels=3, width=v_width, depth=int(layers),
                   num_heads=v_heads, mlp_dim=int(v_width * float(vis.get('mlp_ratio', 4.0))), pool='cls')
    m.text.update(vocab_size=vocab + 1 if text_ids == 'clip_bpe' else vocab,
                  max_len=int(txt.get('context_length', 77)), width=t_width, depth=int(txt.get('layers', 12)),
                  num_heads=t_heads, mlp_dim=int(t_width * float(txt.get('mlp_ratio', 4.0))), causal=True,
                  pool='eot', tokenizer='clip_bpe' if text_ids == 'clip_bpe' else 'bytes')
    if 'tokenizer_path' in m.text:
        m.text.tokenizer_path = tokenizer_path if text_ids == 'clip_bpe' else ''
    elif text_ids == 'clip_bpe':
        raise ConversionError("text_ids 'clip_bpe' needs config key model.text.tokenizer_path, which this mmjax "
                              "version lacks; use text_ids 'raw'")
    c.data.image_mean, c.data.image_std = tuple(image_mean), tuple(image_std)
    return config_lib.conform(c)


# --------------------------------------------------------------------------------------------- the weights

def _t(w: np.ndarray) -> np.ndarray:
    """torch Linear weight [out, in] -> Dense kernel [in, out]."""
    return np.ascontiguousarray(w.T)


def _block(sd: dict, p: str, heads: int) -> dict[str, Any]:
    """One open_clip ResidualAttentionBlock (keys under prefix `p`) -> mmjax EncoderBlock params."""
    w_in, b_in = sd[p + 'attn.in_proj_weight'], sd[p + 'attn.in_proj_bias']
    width = w_in.shape[1]
    if w_in.shape != (3 * width, width) or b_in.shape != (3 * width,):
        raise ConversionError(f'{p}attn.in_proj_weight {w_in.shape} / in_proj_bias {b_in.shape}: expected '
                              f'fused q/k/v of shapes {(3 * width, width)} / {(3 * width,)}')
    k = width // heads
    attn = {}
    for i, name in enumerate(('query', 'key', 'value')):
        attn[name] = {'kernel': _t(w_in[i * width:(i + 1) * width]).reshape(width, heads, k),
                      'bias': b_in[i * width:(i + 1) * width].reshape(heads, k)}
    attn['out'] = {'kernel': _t(sd[p + 'attn.out_proj.weight']).reshape(heads, k, width),
                   'bias': sd[p + 'attn.out_proj.bias']}
    ln = lambda n: {'scale': sd[f'{p}{n}.weight'], 'bias': sd[f'{p}{n}.bias']}  # noqa: E731
    return {'ln_attn': ln('ln_1'), 'attn': attn, 'ln_mlp': ln('ln_2'),
            'mlp': {'fc_in': {'kernel': _t(sd[p + 'mlp.c_fc.weight']), 'bias': sd[p + 'mlp.c_fc.bias']},
                    'fc_out': {'kernel': _t(sd[p + 'mlp.c_proj.weight']), 'bias': sd[p + 'mlp.c_proj.bias']}}}


def _transformer(sd: dict, prefix: str, depth: int, heads: int, scan: bool) -> dict[str, Any]:
    blocks = [_block(sd, f'{prefix}transformer.resblocks.{i}.', heads) for i in range(depth)]
    if scan:
        return {'blocks': jax.tree.map(lambda *xs: np.stack(xs), *blocks)}
    return {f'block_{i}': b for i, b in enumerate(blocks)}


def _ln(sd: dict, name: str) -> dict[str, np.ndarray]:
    return {'scale': sd[name + '.weight'], 'bias': sd[name + '.bias']}


def _token_table(table: np.ndarray, rows: int, text_ids: str) -> np.ndarray:
    """open_clip token table [V, W] -> mmjax's [rows, W] (re-ordered for 'clip_bpe', zero rows appended)."""
    v, w = table.shape
    if text_ids == 'clip_bpe':  # mmjax: 0 pad, 1 SOT (open_clip V-2), 2 EOT (open_clip V-1), v + 3 <- v
        table = np.concatenate([np.zeros((1, w), table.dtype), table[v - 2:v], table[:v - 2]])
    out = np.zeros((rows, w), table.dtype)
    out[:table.shape[0]] = table
    return out


def _used_keys(config, text_prefix: str) -> list[str]:
    """Every open_clip state-dict key the mapping reads, for the missing / unexpected report."""
    m = config.model
    keys = ['visual.' + k for k in ('conv1.weight', 'class_embedding', 'positional_embedding', 'ln_pre.weight',
                                    'ln_pre.bias', 'ln_post.weight', 'ln_post.bias', 'proj')]
    keys += [text_prefix + k for k in ('token_embedding.weight', 'positional_embedding', 'ln_final.weight',
                                       'ln_final.bias', 'text_projection')]
    block = ('ln_1.weight', 'ln_1.bias', 'attn.in_proj_weight', 'attn.in_proj_bias', 'attn.out_proj.weight',
             'attn.out_proj.bias', 'ln_2.weight', 'ln_2.bias', 'mlp.c_fc.weight', 'mlp.c_fc.bias',
             'mlp.c_proj.weight', 'mlp.c_proj.bias')
    for prefix, depth in (('visual.', m.image.depth), (text_prefix, m.text.depth)):
        keys += [f'{prefix}transformer.resblocks.{i}.{k}' for i in range(depth) for k in block]
    keys.append('logit_scale')
    if m.logit_bias_init is not None:
        keys.append('logit_bias')
    return keys


def _listing(keys: list[str], what: str) -> str:
    shown = ', '.join(keys[:8])
    return f'{len(keys)} {what}: {shown}' + (f', ... ({len(keys) - 8} more)' if len(keys) > 8 else '')


def convert_state_dict(sd: dict[str, np.ndarray], config, text_ids: str = 'raw') -> dict[str, Any]:
    """open_clip CLIP state dict (numpy) -> mmjax params (nested dict of float32 numpy arrays) for `config`.

    Raises ConversionError listing missing / unexpected keys (first few and counts) and every array whose
    shape differs from the mmjax model's (`jax.eval_shape` of `build_model(config.model)`).
    """
    sd = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in sd.items()}
    text_prefix = 'text.' if any(k.startswith('text.transformer.') for k in sd) else ''
    used = _used_keys(config, text_prefix)
    missing = [k for k in used if k not in sd]
    unexpected = sorted(set(sd) - set(used))
    if missing or unexpected:
        parts = ([_listing(missing, 'missing keys')] if missing else []) + \
                ([_listing(unexpected, 'unexpected keys')] if unexpected else [])
        raise ConversionError('the state dict does not match the open_clip config: ' + '; '.join(parts))
    sd = {k: np.asarray(v, np.float32) for k, v in sd.items()}
    m = config.model
    conv = sd['visual.conv1.weight']  # [W, C, p, p] -> [(py, px, c), W]
    width = conv.shape[0]
    image = {
        'patch_embed': {'kernel': np.ascontiguousarray(conv.transpose(2, 3, 1, 0).reshape(-1, width)),
                        'bias': np.zeros((width,), np.float32)},
        'cls': sd['visual.class_embedding'],
        'pos_embed': sd['visual.positional_embedding'],
        'ln_pre': _ln(sd, 'visual.ln_pre'),
        'transformer': _transformer(sd, 'visual.', m.image.depth, m.image.num_heads, m.scan_layers),
        'ln_final': _ln(sd, 'visual.ln_post'),
    }
    tp = text_prefix
    rows = -(-m.text.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    text = {
        'token_embed': {'embedding': _token_table(sd[tp + 'token_embedding.weight'], rows, text_ids)},
        'pos_embed': sd[tp + 'positional_embedding'],
        'transformer': _transformer(sd, tp, m.text.depth, m.text.num_heads, m.scan_layers),
        'ln_final': _ln(sd, tp + 'ln_final'),
    }
    params = {'image': {'encoder': image, 'head': {'kernel': sd['visual.proj']}},
              'text': {'encoder': text, 'head': {'kernel': sd[tp + 'text_projection']}},
              'logit_scale': sd['logit_scale'].reshape(())}
    if m.logit_bias_init is not None:
        params['logit_bias'] = sd['logit_bias'].reshape(())
    _check_against_model(params, config)
    return params


def abstract_params(config) -> dict[str, Any]:
    """Shapes of the mmjax model's params (unboxed ShapeDtypeStructs), via `jax.eval_shape`."""
    model = build_model(config.model)
    batch = dummy_batch(config, 1)
    init = lambda r: model.init(r, {k: jnp.zeros(v.shape, v.dtype) for k, v in batch.items()})['params']  # noqa
    return strip_boxes(jax.eval_shape(init, jax.random.key(0)))


def _flat(tree: dict, prefix: str = '') -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f'{prefix}{k}/'))
        else:
            out[prefix + k] = v
    return out


def _check_against_model(params: dict, config) -> None:
    want = _flat(abstract_params(config))
    got = _flat(params)
    problems = [f'mmjax param {k} {tuple(want[k].shape)} has no open_clip source' for k in sorted(set(want) - set(got))]
    problems += [f'converted {k} has no mmjax param' for k in sorted(set(got) - set(want))]
    problems += [f'{k}: converted {tuple(got[k].shape)} vs mmjax {tuple(want[k].shape)}'
                 for k in sorted(set(want) & set(got)) if tuple(got[k].shape) != tuple(want[k].shape)]
    if problems:
        raise ConversionError(f'converted weights do not fit the mmjax model ({len(problems)} problem(s)):\n  '
                              + '\n  '.join(problems[:20]))


# ------------------------------------------------------------------------------------------------ the workdir

def write_workdir(config, params: dict, workdir: str) -> int:
    """Writes W/checkpoints/0 (a TrainState: these params, a fresh optimizer state) and W/config.json as
    `mmjax train` does. Returns the parameter count."""
    storage.makedirs(workdir)
    ckpt_dir = storage.join(workdir, 'checkpoints')
    if storage.listdir(ckpt_dir):
        raise ConversionError(f'{ckpt_dir} already holds checkpoints; use a fresh --workdir')
    devices = jax.devices()[:1]
    run_config = config.copy_and_resolve_references()
    run_config.unlock()
    run_config.mesh.data, run_config.mesh.fsdp, run_config.mesh.tensor = 1, 1, 1
    run_config.lock()
    factory = StateFactory(run_config, shd.make_mesh(run_config.mesh, devices))
    placed = jax.device_put(params, factory.shardings.params)
    with jax.set_mesh(factory.mesh), nn.logical_axis_rules(factory.rules):
        make = jax.jit(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=factory.tx.init(p)),
                       out_shardings=factory.shardings)
        state = make(placed)
    config_json = config_to_json(config)
    ckpt = Checkpointer(ckpt_dir, keep=1, async_save=False)
    ckpt.save(0, state, config_json=config_json, force=True)
    ckpt.close()
    write_config_json(workdir, config_json)
    return factory.param_count()


# ------------------------------------------------------------------------------------------------- inputs

def open_clip_dir() -> str | None:
    """The installed open_clip package's folder (found without importing it, so without torch), or None."""
    spec = importlib.util.find_spec('open_clip')
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def read_model_config(arg: str) -> tuple[dict, dict]:
    """`--model-config`: a JSON path (an open_clip model config, or an HF `open_clip_config.json` with
    'model_cfg' / 'preprocess_cfg') or the name of one of open_clip's built-in configs.
    Returns (model config, preprocess config: maybe 'mean' / 'std')."""
    path = arg
    if not storage.isfile(path):
        base = open_clip_dir()
        candidate = os.path.join(base, 'model_configs', f'{arg}.json') if base else ''
        if not (base and os.path.isfile(candidate)):
            where = ("open_clip's built-in configs" if base else
                     'open_clip built-in configs (open_clip is not installed: pip install -e ".[openclip]")')
            raise ConversionError(f'--model-config {arg!r}: no such file, nor a name among {where}')
        path = candidate
    try:
        data = json.loads(storage.read_bytes(path))
    except ValueError as error:
        raise ConversionError(f'--model-config {path}: not a JSON model config ({error})') from None
    if 'model_cfg' in data:
        return data['model_cfg'], data.get('preprocess_cfg') or {}
    return data, data.get('preprocess_cfg') or {}


def write_bpe_merges(source: str, vocab_size: int, dest: str) -> str:
    """Writes the first `vocab_size - 514` merges of `source` (CLIP BPE: 512 byte symbols, merges, SOT, EOT)
    to `dest` (plain text), so mmjax's 'clip_bpe' tokenizer has exactly open_clip's vocabulary."""
    need = vocab_size - BYTE_SYMBOLS - 2
    data = storage.read_bytes(source)
    lines = (gzip.decompress(data) if source.endswith('.gz') else data).decode('utf-8').split('\n')
    if lines and '#version' in lines[0]:  # CLIP's file starts '"bpe_simple_vocab_16e6.txt#version: 0.2'
        lines = lines[1:]
    merges = [tuple(line.split()) for line in lines if line.strip()]
    if len(merges) < need:
        raise ConversionError(f'{source} has {len(merges)} merges; text_cfg.vocab_size={vocab_size} needs {need}')
    storage.write_text_atomic(dest, f'#version: mmjax convert (first {need} merges of {storage.name(source)})\n'
                              + ''.join(' '.join(pair) + '\n' for pair in merges[:need]))
    return dest


def convert_open_clip(model_config: str, checkpoint: str, workdir: str, *, text_ids: str | None = None,
                      bpe_path: str | None = None, scan_layers: bool = False, log=print,
                      family=None) -> dict[str, Any]:
    """The `mmjax convert open_clip` command: reads the config and weights, writes the workdir, returns a report
    {'params', 'tensors', 'text_ids', 'workdir'}. `family`: (config_fn, state_dict_fn) of another open_clip model
    family, called as `config_from_open_clip` / `convert_state_dict` are (CoCa: `mmjax.interop.open_clip_coca`)."""
    make_config, make_params = family or (config_from_open_clip, convert_state_dict)
    oc, pre = read_model_config(model_config)
    if text_ids is None:
        text_ids = 'raw' if (oc.get('text_cfg') or {}).get('hf_tokenizer_name') else 'clip_bpe'
    workdir = storage.absolute(workdir)
    tokenizer_path = ''
    if text_ids == 'clip_bpe':
        source = bpe_path or (os.path.join(open_clip_dir(), BPE_FILE) if open_clip_dir() else '')
        if not source or not storage.isfile(source):
            raise ConversionError(f"text ids 'clip_bpe' need CLIP's merges file ({BPE_FILE}): pass --bpe-path, "
                                  f"install open_clip, or use --text-ids raw")
        tokenizer_path = storage.join(workdir, 'bpe_merges.txt')
    config = make_config(oc, text_ids=text_ids, tokenizer_path='',
                                   image_mean=pre.get('mean', OPENAI_MEAN), image_std=pre.get('std', OPENAI_STD),
                                   scan_layers=scan_layers)
    sd = load_state_dict(checkpoint)
    params = make_params(sd, config, text_ids)
    config.unlock()
    # mmjax clips exp(logit_scale) at exp(logit_scale_max) (open_clip's training clamp, log 100); weights
    # trained without that clamp (SigLIP ports) keep their own temperature.
    config.model.logit_scale_max = max(float(config.model.logit_scale_max), float(params['logit_scale']))
    config.lock()
    storage.makedirs(workdir)
    if text_ids == 'clip_bpe':
        write_bpe_merges(source, int((oc.get('text_cfg') or {}).get('vocab_size', 49408)), tokenizer_path)
        config.unlock()
        # Relative to the workdir (`config.load_workdir_config` resolves it), so the workdir can be moved.
        config.model.text.tokenizer_path = storage.name(tokenizer_path)
        config.lock()
    count = write_workdir(config, params, workdir)
    report = {'params': count, 'tensors': len(sd), 'text_ids': text_ids, 'workdir': workdir}
    log(f'mmjax: converted {len(sd)} open_clip tensors ({checkpoint}) into {count:,} mmjax parameters; '
        f'activation {config.model.activation}, text ids {text_ids!r}; checkpoint 0 and config.json in {workdir}')
    return report
