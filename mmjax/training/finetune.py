"""Fine-tuning: `config.finetune.mode` as model changes plus regex freeze rules, and `config.init_from`.

A mode is two pieces of data:
  - model changes: fields set on the encoders of `finetune.towers` (`num_prompts`, `adapter_dim`, `lora_*`;
    see mmjax/models/layers.py and encoders.py), all off by default so the default parameter tree is unchanged;
  - a freeze regex over parameter paths ('image/encoder/transformer/block_0/attn/query/kernel', 'logit_scale'),
    appended to `optim.freeze_rules`, so frozen parameters get `optax.set_to_zero` and no optimizer state
    (mmjax/training/optim.py). `finetune.trainable` (a regex) exempts extra parameters from the mode's freezing.

  mode          model change                                  trained
  none / full   -                                             everything (minus optim.freeze_rules)
  linear_probe  -                                             projection heads + logit scale/bias
  adapter       bottleneck adapters after attention and MLP   the adapters ('adapter_attn', 'adapter_mlp')
                in every block, zero-initialised (identity)
  prompt        `prompt_len` learned tokens per tower         the prompts ('prompts')
  lora          W + (alpha/r) A B on `lora_targets`, B = 0    'lora_a', 'lora_b'
  locked_image  -                                             everything outside 'image/' (LiT)

`mmjax.training.init_from.start` loads `init_from` for a fresh run and reports the trainable fraction.
"""

from __future__ import annotations

import copy
from typing import Any

import jax
import ml_collections
import numpy as np

from mmjax.config import FINETUNE_MODES
from mmjax.training.optim import param_labels

MODES = FINETUNE_MODES

# mode -> regex of the parameters it freezes (fullmatch on the '/'-joined path); absent: freezes nothing.
FREEZE = {
    'linear_probe': r'(?![^/]+/head/|logit_).*',
    'adapter': r'(?!.*/adapter_(attn|mlp)/).*',
    'prompt': r'(?!.*/prompts$).*',
    'lora': r'(?!.*/lora_[ab]$).*',
    'locked_image': r'image/.*',
}


def mode_of(config) -> str:
    f = config.get('finetune', None)
    mode = 'none' if f is None else f.mode
    if mode not in MODES:
        raise ValueError(f'finetune.mode: unknown mode {mode!r}; choose one of {MODES}')
    return mode


def tower_fields(config) -> dict[str, Any]:
    """Encoder fields the mode sets on each tower of `finetune.towers` ({} for modes without model changes)."""
    mode, f = mode_of(config), config.get('finetune', None)
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
    mode = mode_of(config)
    if mode not in FREEZE:
        return rules
    frozen = FREEZE[mode]
    if config.finetune.trainable:
        frozen = f'(?!(?:{config.finetune.trainable})$)(?:{frozen})'
    return rules + (frozen,)


def optim_config(config) -> dict[str, Any]:
    """`config.optim` as a dict with the mode's `freeze_rules` (input of `mmjax.training.optim.build_optimizer`)."""
    return dict(config.optim.to_dict(), freeze_rules=freeze_rules(config))


def trainable_mask(params: Any, rules: tuple[str, ...]) -> Any:
    """Tree like `params` of bool: True where no freeze rule fullmatches the parameter's path."""
    return param_labels(params, [(r, False) for r in rules] + [('.*', True)], 'optim.freeze_rules')


def count_trainable(config, params: Any) -> tuple[int, int]:
    """(trainable, total) parameter values of `params` (arrays or ShapeDtypeStructs) under the config's rules."""
    mask = jax.tree.leaves(trainable_mask(params, freeze_rules(config)))
    sizes = [int(np.prod(p.shape)) for p in jax.tree.leaves(params)]
    return sum(s for s, m in zip(sizes, mask) if m), sum(sizes)
