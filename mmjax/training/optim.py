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


# ---------------------------------------------------------------------------------------- a carried state bound

# The train step carries scalar bounds of its state (`TrainState.bound`, float32 [P, M, V]): every |param| <= P,
# every |Adam mu| <= M, every Adam nu in [0, V]. From them and the gradient norm, `StateBound.advance` bounds every
# intermediate of this module's AdamW update and the new state, without reading the state: when all those bounds
# stay below BOUND_LIMIT the update is provably finite, and they are the new state's bounds. When they do not, or
# the bound is unknown (inf: a state from `init`, a restore, or anything not produced by the step), the step checks
# the update exactly and measures the new state (`measure_bound`).
BOUND_LIMIT = 1e37  # float32's largest is 3.4e38: 34x headroom on top of the explicit rounding slack below
UNKNOWN_BOUND = float("inf")
_CARRY = 1 + 2.0 ** -19  # per-step slack on the carried bounds: >= 15 float32 ulps, however the product rounds
_SLACK = 1 + 1e-5  # on quantities recomputed each step (a few float32 roundings, ~6e-8 each)


class StateBound:
    """The constants of `build_optimizer`'s AdamW that bound its update (see `advance` for the proof)."""

    def __init__(self, lr_max: float, b1: float, b2: float, eps: float, decay_max: float, clip_norm: float | None):
        self.lr_max, self.decay_max, self.clip_norm = lr_max * _SLACK, decay_max * _SLACK, clip_norm
        # Adam's bias correction 1 - b**t (t >= 1) is >= 1 - b, less float32's rounding of b and of b**t (< 4e-7).
        self.inv_bc1 = _SLACK / ((1 - b1) - 4e-7)
        self.inv_bc2 = _SLACK / ((1 - b2) - 4e-7)
        self.eps = eps

    def advance(self, bound: jax.Array, grad_norm: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(ok, the new state's bound): ok when the update of a state within `bound`, with finite gradients of
        global norm `grad_norm`, provably produces a finite state (and finite intermediates).

        Proof, elementwise, with g a gradient, p, mu, nu the state, lr <= lr_max the schedule's value, w <= decay_max
        the parameter's decay (weight_decay x its multiplier):
          |g| <= grad_norm (1 + 2u): the norm's sum of squares is at least each term (u = 2**-24, float32's
            rounding); clipping multiplies g by a factor <= 1, and then |g| <= clip_norm (1 + 4u) too.  -> G
          mu' = (1-b1) g + b1 mu: |mu'| <= max(M, G) up to 3 roundings.                                -> M'
          nu' = (1-b2) g**2 + b2 nu >= 0 (nu >= 0), <= max(V, G**2) up to 3 roundings.                  -> V'
          mu_hat = mu' / (1 - b1**t), nu_hat = nu' / (1 - b2**t): <= M' inv_bc1, V' inv_bc2.
          u = mu_hat / (sqrt(nu_hat) + eps): sqrt(nu_hat) >= 0, so |u| <= M' inv_bc1 / eps.             -> U
          d = u + w p (weight decay): |d| <= U + decay_max P.                                          -> D
          p' = p - lr d = p (1 - lr w) - lr u: |p'| <= P + lr_max U (lr_max decay_max <= 0.5 is required), up to
            a relative 4 roundings on each term (< 5e-7: the slack _CARRY on P, _SLACK on U; _CARRY adds >= 8.9e-7
            however this float32 product rounds).                                                      -> P'
        Every quantity below BOUND_LIMIT (a comparison that fails for inf and NaN) leaves 34x headroom to float32's
        largest finite value.
        """
        p, m, v = bound[0], bound[1], bound[2]
        g = grad_norm.astype(jnp.float32) * _SLACK + 1e-18  # + 1e-18: a |g| whose square underflows
        if self.clip_norm is not None:
            g = jnp.minimum(g, jnp.float32(self.clip_norm * _SLACK))
        m_new = jnp.maximum(m, g) * _CARRY
        v_new = jnp.maximum(v, g * g * _SLACK) * _CARRY
        u = m_new * jnp.float32(self.inv_bc1 * _SLACK / self.eps)
        d = (u + p * jnp.float32(self.decay_max)) * _SLACK
        p_new = p * jnp.float32(_CARRY) + u * jnp.float32(self.lr_max * _SLACK)
        checked = jnp.stack([p_new, m_new, v_new, m_new * jnp.float32(self.inv_bc1),
                             v_new * jnp.float32(self.inv_bc2), u, d, jnp.float32(self.lr_max) * d])
        ok = jnp.all(checked < BOUND_LIMIT) & jnp.all(bound >= 0) & jnp.isfinite(grad_norm)
        return ok, jnp.stack([p_new, m_new, v_new])


def state_bound(optim_cfg: Any, params: Any) -> StateBound | None:
    """The `StateBound` of the optimizer `build_optimizer(optim_cfg, params, ...)` builds; None when its update
    cannot be bounded this way (b1 or b2 not in [0, 1 - 1e-6), eps too small for BOUND_LIMIT, lr x weight decay
    above 0.5, or parameters that are not float32): the step then checks every update exactly."""
    b1, b2, eps = float(_get(optim_cfg, 'b1')), float(_get(optim_cfg, 'b2')), float(_get(optim_cfg, 'eps'))
    lr, end = float(_get(optim_cfg, 'lr')), float(_get(optim_cfg, 'end_lr_factor'))
    clip = _get(optim_cfg, 'clip_norm')
    wd = float(_get(optim_cfg, 'weight_decay'))
    multipliers = [float(m) for _, m in _get(optim_cfg, 'wd_rules')]
    leaves = jax.tree.leaves(params, is_leaf=_is_boxed)
    dtypes = {jnp.dtype((x.value if _is_boxed(x) else x).dtype) for x in leaves}
    decay_max = wd * max(multipliers + [0.0])
    if (not (0 <= b1 < 1 - 1e-6 and 0 <= b2 < 1 - 1e-6 and eps > 0 and lr >= 0 and lr * max(1.0, end) * decay_max
             <= 0.5) or dtypes - {jnp.dtype(jnp.float32)}):
        return None
    rule = StateBound(lr * max(1.0, end), b1, b2, eps, decay_max,
                      None if clip is None else float(clip))
    # A state with every bound at 1e6 must pass: with the configured constants the bound has room to grow.
    ok, _ = rule.advance(jnp.full((3,), 1e6, jnp.float32), jnp.float32(1.0))
    return rule if bool(ok) else None


def adam_moments(opt_state: Any) -> tuple[list, list] | None:
    """(mu leaves, nu leaves) of every `scale_by_adam` state in `opt_state`; None when `opt_state` holds floating
    point leaves that are not Adam's moments (an optimizer `StateBound` does not describe)."""
    adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
    mu, nu, other = [], [], []
    for node in jax.tree.leaves(opt_state, is_leaf=adam):
        if adam(node):
            mu += jax.tree.leaves(node.mu)
            nu += jax.tree.leaves(node.nu)
        elif jnp.issubdtype(jnp.result_type(node), jnp.floating):
            other.append(node)
    if other or not mu or any(jnp.result_type(x) != jnp.float32 for x in mu + nu):
        return None
    return mu, nu


def measure_bound(params: Any, opt_state: Any) -> jax.Array:
    """The bound [max |param|, max |mu|, max nu] of a finite state (`StateBound`); inf where some nu < 0."""
    mu, nu = adam_moments(opt_state)

    def most(xs, f):
        return jnp.max(jnp.stack([jnp.max(f(x)).astype(jnp.float32) for x in xs])) if xs else jnp.float32(0)

    floats = [x for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.floating)]
    v = most(nu, lambda x: x)
    v = jnp.where(most(nu, lambda x: -x) > 0, jnp.float32(UNKNOWN_BOUND), v)  # a negative nu: no bound
    return jnp.stack([most(floats, jnp.abs), most(mu, jnp.abs), v])
