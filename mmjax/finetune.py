"""Fine-tuning: `config.finetune.mode` as model changes plus regex freeze rules, and `config.init_from`.

A mode is two pieces of data:
  - model changes: fields set on the encoders of `finetune.towers` (`num_prompts`, `adapter_dim`, `lora_*`;
    see mmjax/models/layers.py and encoders.py), all off by default so the default parameter tree is unchanged;
  - a freeze regex over parameter paths ('image/encoder/transformer/block_0/attn/query/kernel', 'logit_scale'),
    appended to `optim.freeze_rules`, so frozen parameters get `optax.set_to_zero` and no optimizer state
    (mmjax/optim.py). `finetune.trainable` (a regex) exempts extra parameters from the mode's freezing.

  mode          model change                                  trained
  none / full   -                                             everything (minus optim.freeze_rules)
  linear_probe  -                                             projection heads + logit scale/bias
  adapter       bottleneck adapters after attention and MLP   the adapters ('adapter_attn', 'adapter_mlp')
                in every block, zero-initialised (identity)
  prompt        `prompt_len` learned tokens per tower         the prompts ('prompts')
  lora          W + (alpha/r) A B on `lora_targets`, B = 0    'lora_a', 'lora_b'
  locked_image  -                                             everything outside 'image/' (LiT)

`start(config, factory, state)` is what a fresh training run calls: it loads `init_from` (whole model or the
parameters matching `init_from.include`) and reports what was loaded, newly initialised and ignored.
"""

from __future__ import annotations

import copy
import os
import re
from collections import Counter
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmjax.config import FINETUNE_MODES
from mmjax.optim import param_labels, param_path

MODES = FINETUNE_MODES

# mode -> regex of the parameters it freezes (fullmatch on the '/'-joined path); absent: freezes nothing.
FREEZE = {
    'linear_probe': r'(?![^/]+/head/|logit_).*',
    'adapter': r'(?!.*/adapter_(attn|mlp)/).*',
    'prompt': r'(?!.*/prompts$).*',
    'lora': r'(?!.*/lora_[ab]$).*',
    'locked_image': r'image/.*',
}


def _mode(config) -> str:
    f = config.get('finetune', None)
    mode = 'none' if f is None else f.mode
    if mode not in MODES:
        raise ValueError(f'finetune.mode: unknown mode {mode!r}; choose one of {MODES}')
    return mode


def tower_fields(config) -> dict[str, Any]:
    """Encoder fields the mode sets on each tower of `finetune.towers` ({} for modes without model changes)."""
    mode, f = _mode(config), config.get('finetune', None)
    if mode == 'adapter':
        return dict(adapter_dim=int(f.adapter_dim))
    if mode == 'prompt':
        return dict(num_prompts=int(f.prompt_len))
    if mode == 'lora':
        return dict(lora_rank=int(f.lora_rank), lora_alpha=float(f.lora_alpha), lora_targets=str(f.lora_targets))
    return {}


def model_config(config) -> ml_collections.ConfigDict:
    """`config.model`, with the mode's encoder fields added to the sections of `finetune.towers`."""
    fields = tower_fields(config)
    if not fields:
        return config.model
    model = copy.deepcopy(config.model)
    model.unlock()
    for tower in config.finetune.towers:
        model[tower].update(fields)
    return model


def freeze_rules(config) -> tuple[str, ...]:
    """`optim.freeze_rules` plus the mode's freeze regex (with `finetune.trainable` exempted)."""
    rules = tuple(config.optim.freeze_rules)
    mode = _mode(config)
    if mode not in FREEZE:
        return rules
    frozen = FREEZE[mode]
    if config.finetune.trainable:
        frozen = f'(?!(?:{config.finetune.trainable})$)(?:{frozen})'
    return rules + (frozen,)


def optim_config(config) -> dict[str, Any]:
    """`config.optim` as a dict with the mode's `freeze_rules` (input of `mmjax.optim.build_optimizer`)."""
    return dict(config.optim.to_dict(), freeze_rules=freeze_rules(config))


def trainable_mask(params: Any, rules: tuple[str, ...]) -> Any:
    """Tree like `params` of bool: True where no freeze rule fullmatches the parameter's path."""
    return param_labels(params, [(r, False) for r in rules] + [('.*', True)], 'optim.freeze_rules')


def count_trainable(config, params: Any) -> tuple[int, int]:
    """(trainable, total) parameter values of `params` (arrays or ShapeDtypeStructs) under the config's rules."""
    mask = jax.tree.leaves(trainable_mask(params, freeze_rules(config)))
    sizes = [int(np.prod(p.shape)) for p in jax.tree.leaves(params)]
    return sum(s for s, m in zip(sizes, mask) if m), sum(sizes)


def abstract_params(config) -> Any:
    """Shapes of the parameters of `config`'s model (no mesh, nothing allocated)."""
    from mmjax.state import build_task_model, dummy_batch, strip_boxes  # mmjax.state imports this module
    model = build_task_model(config)
    shapes = dummy_batch(config, 1)

    def init(rng):
        return model.init(rng, {k: jnp.zeros(v.shape, v.dtype) for k, v in shapes.items()})['params']

    return strip_boxes(jax.eval_shape(init, jax.random.key(0)))


def trainable_problems(config) -> list[str]:
    """[problem] when the mode and `optim.freeze_rules` leave no trainable parameter, else []."""
    params = abstract_params(config)
    trainable, total = count_trainable(config, params)
    if trainable:
        return []
    return [f'finetune.mode={config.finetune.mode!r} with optim.freeze_rules={tuple(config.optim.freeze_rules)!r} '
            f'(finetune.trainable={config.finetune.trainable!r}) freezes every parameter ({total} values); '
            f'nothing would train. Change finetune.mode, or set finetune.trainable to a regex of what to train']


# ----------------------------------------------------------------------------------------------- init_from

def _flat(tree: Any) -> dict[str, Any]:
    return {param_path(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def merge_params(target: Any, source: Any, include: str = '.*') -> tuple[Any, dict[str, list[str]]]:
    """Copies into `target` every parameter of `source` whose path fullmatches `include` and exists in both.

    Returns (params like `target`, report) with report = {'loaded': paths copied, 'initialised': target paths
    kept as they were (absent from the source or not included), 'ignored': source paths not used}. Copied
    arrays take the target's dtype and sharding. Raises ValueError naming a parameter whose shapes differ.
    """
    pattern = re.compile(include)
    src = _flat(source)
    report: dict[str, list[str]] = {'loaded': [], 'initialised': [], 'ignored': []}

    def pick(path, leaf):
        name = param_path(path)
        if name not in src or not pattern.fullmatch(name):
            report['initialised'].append(name)
            return leaf
        value = src[name]
        if tuple(value.shape) != tuple(leaf.shape):
            raise ValueError(f'init_from: parameter {name!r} has shape {tuple(value.shape)} in the checkpoint '
                             f'but {tuple(leaf.shape)} in the model; exclude it with init_from.include or use a '
                             f'matching model config')
        report['loaded'].append(name)
        value = jnp.asarray(value, leaf.dtype)
        sharding = getattr(leaf, 'sharding', None)
        return jax.device_put(value, sharding) if sharding is not None else value

    params = jax.tree_util.tree_map_with_path(pick, target)
    used = set(report['loaded'])
    report['ignored'] = sorted(n for n in src if n not in used)
    return params, report


def _fold(name: str, tail: int | None) -> str:
    """Path with block numbers folded ('block_*'); with `tail`, only its first 2 and last `tail` components."""
    parts = re.sub(r'block_\d+', 'block_*', name).split('/')
    if tail is None or len(parts) <= 2 + tail:
        return '/'.join(parts)
    return '/'.join(parts[:2] + ['...'] + (parts[-tail:] if tail else []))


def summarise(names: list[str], depth: int | None = None, max_groups: int = 16) -> str:
    """'prefix (count), ...' of parameter paths: the first `depth` components, or (depth None) the paths with
    block numbers folded, shortened to their first 2 and last few components until at most `max_groups`."""
    if not names:
        return '-'
    if depth is not None:
        groups = Counter('/'.join(n.split('/')[:depth]) for n in names)
    else:
        for tail in (None, 3, 2, 1, 0):
            groups = Counter(_fold(n, tail) for n in names)
            if len(groups) <= max_groups:
                break
    return ', '.join(f'{k} ({c})' for k, c in sorted(groups.items()))


def format_report(report: dict[str, list[str]], where: str, sizes: dict[str, int] | None = None) -> str:
    """The human-readable init_from report: loaded / newly initialised / ignored with counts and prefixes."""
    def count(names):
        values = f', {sum(sizes[n] for n in names) / 1e6:.3f}M values' if sizes else ''
        return f'{len(names)} tensors{values}'
    return '\n'.join([
        f'mmjax: init_from {where}',
        f"  loaded {count(report['loaded'])}: {summarise(report['loaded'], depth=2)}",
        f"  newly initialised {len(report['initialised'])} tensors: {summarise(report['initialised'])}",
        f"  ignored (in the checkpoint, not loaded) {len(report['ignored'])} tensors: "
        f"{summarise(report['ignored'])}",
    ])


def resolve_source(path: str, step: int | None) -> tuple[str, str, int]:
    """init_from.path (a workdir, its checkpoints/ folder or one step folder in it) -> (workdir, checkpoints
    folder, step). Raises FileNotFoundError / ValueError naming `init_from.path` / `init_from.step`."""
    from mmjax.checkpoint import Checkpointer
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f'init_from.path: {path!r} is not a folder')
    if os.path.isdir(os.path.join(path, 'checkpoints')):
        workdir, directory = path, os.path.join(path, 'checkpoints')
    elif os.path.basename(path).isdigit():
        directory = os.path.dirname(path)
        workdir = os.path.dirname(directory)
        if step is not None and step != int(os.path.basename(path)):
            raise ValueError(f'init_from.path names step {os.path.basename(path)} but init_from.step={step}')
        step = int(os.path.basename(path))
    else:
        workdir, directory = os.path.dirname(path), path
    ckpt = Checkpointer(directory, async_save=False, read_only=True)
    steps = sorted(ckpt.all_steps())
    ckpt.close()
    if not steps:
        raise FileNotFoundError(f'init_from.path: no checkpoints in {directory}')
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ValueError(f'init_from.step={step}: no such checkpoint in {directory}; available: {steps}')
    return workdir, directory, step


def load_source_params(config, mesh) -> tuple[Any, str]:
    """Restores the parameters of `config.init_from` onto `mesh`: (params, 'where (step N)')."""
    from mmjax import config as config_lib
    from mmjax.checkpoint import Checkpointer
    from mmjax.state import StateFactory
    workdir, directory, step = resolve_source(config.init_from.path, config.init_from.step)
    ckpt = Checkpointer(directory, async_save=False, read_only=True)
    try:
        saved = None if os.path.exists(os.path.join(workdir, 'config.json')) else ckpt.restore_config(step)
        source_config = config_lib.load_workdir_config(workdir, saved)  # unlocked
        source_config.mesh.update({axis: int(size) for axis, size in mesh.shape.items()})
        source_config.init_from.path = ''
        source_config.lock()
        factory = StateFactory(source_config, mesh)
        state = ckpt.restore(step, factory.abstract)
    finally:
        ckpt.close()
    return state.params, f'{directory} (step {step})'


def start(config, factory, state, log: Callable[[str], Any] = print):
    """The state a fresh run starts from: `state` with `config.init_from` loaded (and reported).

    Also reports the trainable fraction when a fine-tuning mode or freeze rules are set.
    """
    if _mode(config) != 'none' or config.optim.freeze_rules:
        trainable, total = count_trainable(config, state.params)
        log(f'mmjax: finetune.mode={config.finetune.mode!r}: training {trainable} of {total} parameter values '
            f'({100.0 * trainable / total:.2f}%)')
    if not config.init_from.path:
        return state
    source, where = load_source_params(config, factory.mesh)
    params, report = merge_params(state.params, source, config.init_from.include)
    sizes = {n: int(np.prod(leaf.shape)) for n, leaf in _flat(params).items()}
    log(format_report(report, where, sizes))
    return state.replace(params=params)
