"""`config.init_from`: a fresh run starts from other runs' parameters (all, or those matching
`init_from.include`), and says what was loaded, newly initialised and ignored.

Sources: `init_from.path` (with `step`, `include`, `rename`), then each of `init_from.more`, a dict with the same
keys (e.g. Flamingo: the LM from a text-only run, the vision tower from a contrastive run). `rename` maps a
checkpoint's parameter names onto the model's: ((regex, replacement), ...), the first regex that fullmatches a
name gives its new name (`re.Match.expand`), e.g. ('image/encoder/(.*)', r'vision/\1'); `include` matches the
model's names. A parameter that two sources would load is an error.

`start(config, factory, state)` is what a fresh training run calls; it also reports the trainable fraction
under a fine-tuning mode or freeze rules.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmjax import config as config_lib
from mmjax import storage
from mmjax.errors import ConfigError
from mmjax.training.checkpoint import Checkpointer
from mmjax.training.finetune import count_trainable, mode_of
from mmjax.training.optim import param_path
from mmjax.training.state import StateFactory


def _flat(tree: Any) -> dict[str, Any]:
    return {param_path(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def rename_params(names: Any, rename: Any = ()) -> dict[str, str]:
    """{checkpoint name: model name} for `names` under `rename` ((regex, replacement) pairs; the first regex
    that fullmatches a name renames it; names no regex matches keep theirs)."""
    rules = [(re.compile(pattern), replacement) for pattern, replacement in rename]

    def renamed(name: str) -> str:
        for regex, replacement in rules:
            match = regex.fullmatch(name)
            if match:
                return match.expand(replacement)
        return name
    return {name: renamed(name) for name in names}


def merge_params(target: Any, source: Any, include: str = '.*', rename: Any = ()
                 ) -> tuple[Any, dict[str, list[str]]]:
    """Copies into `target` every parameter of `source` whose (renamed, see `rename_params`) path fullmatches
    `include` and exists in both.

    Returns (params like `target`, report) with report = {'loaded': paths copied (the model's names),
    'initialised': target paths kept as they were (absent from the source or not included), 'ignored': source
    paths not used (the checkpoint's names)}. Copied arrays take the target's dtype and sharding. Raises
    ConfigError naming a parameter whose shapes differ.
    """
    pattern = re.compile(include)
    flat = _flat(source)
    names = rename_params(flat, rename)
    src = {names[k]: v for k, v in flat.items()}
    checkpoint_name = {v: k for k, v in names.items()}
    report: dict[str, list[str]] = {'loaded': [], 'initialised': [], 'ignored': []}

    def pick(path, leaf):
        name = param_path(path)
        if name not in src or not pattern.fullmatch(name):
            report['initialised'].append(name)
            return leaf
        value = src[name]
        if tuple(value.shape) != tuple(leaf.shape):
            raise ConfigError([f'init_from: parameter {name!r} has shape {tuple(value.shape)} in the checkpoint '
                               f'but {tuple(leaf.shape)} in the model; exclude it with init_from.include or use a '
                               f'matching model config'])
        report['loaded'].append(name)
        value = jnp.asarray(value, leaf.dtype)
        sharding = getattr(leaf, 'sharding', None)
        return jax.device_put(value, sharding) if sharding is not None else value

    params = jax.tree_util.tree_map_with_path(pick, target)
    used = set(report['loaded'])
    report['ignored'] = sorted(checkpoint_name[n] for n in src if n not in used)
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
    """init_from.path (a workdir, its checkpoints/ folder or one step folder in it; local or a gs:// / s3:// URL)
    -> (workdir, checkpoints folder, step). Raises ConfigError naming `init_from.path` / `init_from.step`."""
    path = storage.absolute(path).rstrip("/")
    if not storage.isdir(path):
        raise ConfigError([f"init_from.path: {path!r} is not a folder (give a workdir, its checkpoints/ folder "
                           f"or one step folder in it)"])
    if storage.isdir(storage.join(path, 'checkpoints')):
        workdir, directory = path, storage.join(path, 'checkpoints')
    elif storage.name(path).isdigit():
        directory = storage.parent(path)
        workdir = storage.parent(directory)
        if step is not None and step != int(storage.name(path)):
            raise ConfigError([f'init_from.path names step {storage.name(path)} but init_from.step={step}: '
                               f'leave one of them out'])
        step = int(storage.name(path))
    else:
        workdir, directory = storage.parent(path), path
    ckpt = Checkpointer(directory, async_save=False, read_only=True)
    try:
        return workdir, directory, ckpt.choose_step(step, key='init_from.step')
    finally:
        ckpt.close()


def sources(config) -> list[dict[str, Any]]:
    """The init_from sources of `config`, in load order: dicts with path, step, include, rename."""
    f = config.init_from
    first = [dict(path=f.path, step=f.step, include=f.include, rename=tuple(f.get('rename', ())))] if f.path else []
    return first + [dict(dict(step=None, include='.*', rename=()), **dict(more)) for more in f.get('more', ())]


def load_source_params(source: dict[str, Any], mesh) -> tuple[Any, str]:
    """Restores the parameters of one init_from source (see `sources`) onto `mesh`: (params, 'where (step N)')."""
    workdir, directory, step = resolve_source(source['path'], source['step'])
    ckpt = Checkpointer(directory, async_save=False, read_only=True)
    try:
        saved = None if storage.exists(storage.join(workdir, 'config.json')) else ckpt.restore_config(step)
        source_config = config_lib.load_workdir_config(workdir, saved)  # unlocked
        source_config.mesh.update({axis: int(size) for axis, size in mesh.shape.items()})
        source_config.init_from.path = ''
        if 'more' in source_config.init_from:
            source_config.init_from.more = ()
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
    if mode_of(config) != 'none' or config.optim.freeze_rules:
        trainable, total = count_trainable(config, state.params)
        log(f'mmjax: finetune.mode={config.finetune.mode!r}: training {trainable} of {total} parameter values '
            f'({100.0 * trainable / total:.2f}%)')
    params, loaded_by = state.params, {}
    for source in sources(config):
        source_params, where = load_source_params(source, factory.mesh)
        params, report = merge_params(params, source_params, source['include'], source['rename'])
        for name in report['loaded']:
            if name in loaded_by:
                raise ConfigError([f'init_from: parameter {name!r} is loaded from both {loaded_by[name]} and '
                                   f'{where}; narrow one source\'s include'])
            loaded_by[name] = where
        sizes = {n: int(np.prod(leaf.shape)) for n, leaf in _flat(params).items()}
        log(format_report(report, where, sizes))
    return state.replace(params=params)
