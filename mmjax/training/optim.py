"""Optimiser: learning-rate schedule, AdamW with per-parameter weight decay, freezing, all driven by regex rules.

Rules are data: a sequence of ``(regex, value)`` pairs matched with ``re.fullmatch`` against a parameter's path, the
tree keys joined by '/' (e.g. ``'image/Encoder_0/block_0/Dense_0/kernel'``, ``'logit_scale'``). The first matching rule
wins; a parameter that matches no rule is an error that names it, never a silent default.

Trees may hold arrays, ``jax.ShapeDtypeStruct`` (abstract params from ``jax.eval_shape``) or flax boxed leaves
(``nn.Partitioned``/``nn.LogicallyPartitioned``); a boxed leaf is treated as one parameter, so its path is the same
as after ``nn.unbox``. Only paths matter, never values.

Config keys (``optim_cfg``, a ConfigDict or dict; a missing key takes the value in ``DEFAULTS``):
  lr, b1, b2, eps, weight_decay   AdamW (decoupled decay, applied as ``-lr * weight_decay * multiplier * param``)
  clip_norm                        global-norm gradient clipping; None disables
  warmup_steps, decay, end_lr_factor  linear warmup 0 -> lr, then 'cosine' | 'linear' | 'constant' to lr*end_lr_factor
  wd_rules                         (regex, multiplier) pairs; every parameter must match one
  freeze_rules                     regexes; matching parameters get zero updates and no optimizer state
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

Rules = Sequence[tuple[str, Any]]

DECAYS = ('cosine', 'linear', 'constant')

# No weight decay for biases, norm scales, embeddings/position embeddings, class tokens and the logit scale/bias.
DEFAULT_WD_RULES: tuple[tuple[str, float], ...] = (
    (r'(.*/)?(bias|scale|embedding|pos_embed\w*|cls\w*|logit_\w+)', 0.0),
    (r'.*', 1.0),
)

DEFAULTS: dict[str, Any] = dict(
    lr=1e-3,
    b1=0.9,
    b2=0.98,
    eps=1e-6,
    weight_decay=0.1,
    clip_norm=1.0,
    warmup_steps=0,
    decay='cosine',
    end_lr_factor=0.0,
    wd_rules=DEFAULT_WD_RULES,
    freeze_rules=(),
)

_FROZEN, _TRAINABLE = 'frozen', 'trainable'


def _get(optim_cfg: Any, key: str) -> Any:
    """Value of ``optim_cfg[key]``, or ``DEFAULTS[key]`` when the key is absent."""
    return optim_cfg[key] if key in optim_cfg else DEFAULTS[key]


def _is_boxed(x: Any) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def _key_name(key: Any) -> str:
    for attr in ('key', 'name', 'idx'):  # DictKey / FlattenedIndexKey, GetAttrKey, SequenceKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def param_path(path: Sequence[Any]) -> str:
    """'/'-joined name of a ``jax.tree_util`` key path, e.g. ``'text/Embed_0/embedding'``."""
    return '/'.join(_key_name(k) for k in path)


def _compile_rules(rules: Rules, what: str) -> list[tuple[re.Pattern, Any]]:
    compiled = []
    for rule in rules:
        if isinstance(rule, str) or len(rule) != 2:
            raise ValueError(f'{what}: each rule must be a (regex, value) pair; got {rule!r}.')
        pattern, value = rule
        try:
            compiled.append((re.compile(pattern), value))
        except re.error as e:
            raise ValueError(f'{what}: invalid regex {pattern!r}: {e}') from e
    return compiled


def param_labels(params: Any, rules: Rules, what: str = 'rules') -> Any:
    """Maps every parameter to the value of the first rule whose regex fullmatches its path.

    Args:
      params: pytree of parameters (arrays, ShapeDtypeStructs or flax boxed leaves).
      rules: sequence of (regex, value); values must not be None (None is an empty pytree).
      what: name of the rules for error messages (e.g. 'optim.wd_rules').

    Returns:
      A pytree like ``params`` (a boxed leaf replaced by one value) holding the matched values.

    Raises:
      ValueError: naming the first parameter that matches no rule.
    """
    compiled = _compile_rules(rules, what)

    def label(path, _):
        name = param_path(path)
        for pattern, value in compiled:
            if pattern.fullmatch(name):
                return value
        raise ValueError(f'{what}: parameter {name!r} matches no rule; patterns: {[p.pattern for p, _ in compiled]}.')

    return jax.tree_util.tree_map_with_path(label, params, is_leaf=_is_boxed)


def make_schedule(optim_cfg: Any, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``lr`` over ``warmup_steps``, then decay to ``lr * end_lr_factor`` at ``total_steps``.

    ``decay='constant'`` holds ``lr`` after warmup (``end_lr_factor`` unused). Steps past ``total_steps`` keep the
    final value.
    """
    lr = float(_get(optim_cfg, 'lr'))
    warmup = int(_get(optim_cfg, 'warmup_steps'))
    decay = _get(optim_cfg, 'decay')
    end_factor = float(_get(optim_cfg, 'end_lr_factor'))
    if lr < 0:
        raise ValueError(f'optim.lr must be >= 0; got {lr}.')
    if warmup < 0:
        raise ValueError(f'optim.warmup_steps must be >= 0; got {warmup}.')
    if end_factor < 0:
        raise ValueError(f'optim.end_lr_factor must be >= 0; got {end_factor}.')
    if decay not in DECAYS:
        raise ValueError(f'optim.decay must be one of {list(DECAYS)}; got {decay!r}.')
    if warmup > total_steps:
        raise ValueError(f'optim.warmup_steps ({warmup}) is longer than the total steps ({total_steps}).')
    decay_steps = max(int(total_steps) - warmup, 1)

    if decay == 'cosine':
        main = optax.cosine_decay_schedule(lr, decay_steps, alpha=end_factor)
    elif decay == 'linear':
        main = optax.linear_schedule(lr, lr * end_factor, decay_steps)
    else:
        main = optax.constant_schedule(lr)
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def _weight_decay(weight_decay: float, wd_rules: Rules) -> optax.GradientTransformation:
    """Adds ``weight_decay * multiplier * param`` to each update; one masked transform per distinct multiplier.

    Multipliers come from ``wd_rules`` evaluated on the ``params`` given to ``update`` (paths are static, so this is
    free under jit). Multiplier 0 adds nothing.
    """
    multipliers = sorted({float(m) for _, m in wd_rules if float(m) != 0.0})
    if weight_decay == 0.0 or not multipliers:
        return optax.identity()

    def mask_for(multiplier: float) -> Callable[[Any], Any]:
        return lambda params: jax.tree.map(lambda m: float(m) == multiplier,
                                           param_labels(params, wd_rules, 'optim.wd_rules'))

    return optax.chain(*[optax.add_decayed_weights(weight_decay * m, mask=mask_for(m)) for m in multipliers])


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """``optax.clip_by_global_norm`` that can take the norm from its caller: ``update(..., grad_norm=n)`` clips by
    ``n`` instead of computing it again. The train step computes the gradients' global norm for its metrics
    anyway, so with it the norm (a pass over every gradient) runs once per step. ``n`` must be the norm of the
    updates this transform sees (under freezing: of the trainable ones, see ``mmjax.losses.gradcache.stop_frozen_gradients``).
    """

    def update_fn(updates, state, params=None, *, grad_norm=None, **extra_args):
        del params, extra_args
        norm = optax.global_norm(updates) if grad_norm is None else grad_norm
        # One scalar factor (exactly 1 below the threshold): XLA fuses `t * factor` into each consumer, where
        # optax's per-element `t / norm * max_norm` was written out as a copy of every gradient first.
        factor = jnp.where(norm < max_norm, jnp.ones_like(norm), max_norm / norm)
        return jax.tree.map(lambda t: t * factor.astype(t.dtype), updates), state

    return optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn)


def _freeze_labels(params: Any, freeze_rules: Sequence[str]) -> Any:
    rules = [(pattern, _FROZEN) for pattern in freeze_rules] + [('.*', _TRAINABLE)]
    return param_labels(params, rules, 'optim.freeze_rules')


def build_optimizer(optim_cfg: Any, params: Any, total_steps: int
                    ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with global-norm clipping, a learning-rate schedule, per-parameter weight decay and freezing.

    Chain for trainable parameters: clip_by_global_norm(clip_norm) -> scale_by_adam(b1, b2, eps) ->
    add weight_decay * multiplier * param -> scale by -schedule(step). Frozen parameters (``freeze_rules``) get zero
    updates, hold no optimizer state and do not count in the clipping norm.

    Args:
      optim_cfg: optimiser config (keys in the module docstring).
      params: parameter pytree, concrete or abstract; used to check every parameter against the rules now.
      total_steps: number of training steps (end of the schedule).

    Returns:
      (optimizer, schedule). ``optimizer.update`` needs ``params`` (weight decay reads them) and takes an optional
      ``grad_norm=`` (the gradients' global norm, when the caller has it; see ``clip_by_global_norm``).
    """
    wd_rules = tuple(tuple(rule) for rule in _get(optim_cfg, 'wd_rules'))
    freeze_rules = _get(optim_cfg, 'freeze_rules')
    if isinstance(freeze_rules, str):
        raise ValueError(f'optim.freeze_rules must be a list of regexes; got the string {freeze_rules!r}.')
    freeze_rules = tuple(freeze_rules)
    weight_decay = float(_get(optim_cfg, 'weight_decay'))
    clip_norm = _get(optim_cfg, 'clip_norm')
    if weight_decay < 0:
        raise ValueError(f'optim.weight_decay must be >= 0; got {weight_decay}.')
    if clip_norm is not None and float(clip_norm) <= 0:
        raise ValueError(f'optim.clip_norm must be > 0 or None; got {clip_norm}.')
    for pattern, multiplier in wd_rules:
        if not isinstance(multiplier, (int, float)) or multiplier < 0:
            raise ValueError(f'optim.wd_rules: multiplier for {pattern!r} must be a number >= 0; got {multiplier!r}.')
    param_labels(params, wd_rules, 'optim.wd_rules')  # fail now, naming any unmatched parameter
    names = [param_path(path) for path, _ in jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_boxed)[0]]
    for pattern in freeze_rules:
        if not any(re.fullmatch(pattern, name) for name in names):
            raise ValueError(f'optim.freeze_rules: {pattern!r} matches no parameter.')

    schedule = make_schedule(optim_cfg, total_steps)
    transforms = [clip_by_global_norm(float(clip_norm))] if clip_norm is not None else []
    transforms += [
        optax.scale_by_adam(b1=float(_get(optim_cfg, 'b1')), b2=float(_get(optim_cfg, 'b2')),
                            eps=float(_get(optim_cfg, 'eps'))),
        _weight_decay(weight_decay, wd_rules),
        optax.scale_by_learning_rate(schedule),
    ]
    optimizer = optax.chain(*transforms)
    if freeze_rules:  # each rule matched a parameter above
        optimizer = optax.multi_transform(
            {_TRAINABLE: optimizer, _FROZEN: optax.set_to_zero()},
            lambda p: _freeze_labels(p, freeze_rules))
    return optimizer, schedule
