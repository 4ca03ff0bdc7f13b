"""Checks that read files or build models, run after the config's own validation and before anything compiles:
the tokenizer's vocabulary file, data specs and the prepared-data folder, the audio's sample rate against its
dataset, `init_from.path`, and whether a fine-tuning mode leaves anything to train.

    preflight.check(config, num_devices, process_count)   # every problem at once, as one ConfigError
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from mmjax import config as config_lib
from mmjax import storage, tasks
from mmjax.data import builders, sources, speech_triples, stream
from mmjax.data.tokenizers import TOKENIZERS, get_tokenizer
from mmjax.errors import ConfigError, StorageError
from mmjax.models.layers import strip_boxes
from mmjax.training import finetune
from mmjax.training.state import build_task_model


def check(config, num_devices: int, process_count: int = 1, reads_init_from: bool = True) -> tuple[int, ...]:
    """`mmjax.tasks.validate` (the config's and the task's own checks), then the checks that need files. Raises
    one ConfigError listing every problem, each naming its key. Returns the resolved mesh shape.

    reads_init_from=False (`mmjax compile`, which builds shapes and loads no weights): the `init_from` workdirs
    need not exist yet, e.g. a Flamingo config compiled before its language model is trained."""
    problems, mesh_shape = [], None
    unreachable = storage_problems(config, init_from=reads_init_from)
    if unreachable:  # the file checks below would only repeat these
        raise StorageError("; ".join(unreachable))
    try:
        mesh_shape = tasks.validate(config, num_devices, process_count)
    except ConfigError as e:
        problems += e.problems
    problems += _tokenizer_problems(config.model.text) + _data_problems(config) + _audio_rate_problems(config)
    problems += _init_from_problems(config) if reads_init_from else []
    if not problems and (config.finetune.mode != "none" or config.optim.freeze_rules):
        try:
            problems += trainable_problems(config)
        except ValueError as e:
            problems.append(str(e))
    if problems:
        raise ConfigError(problems)
    return mesh_shape


def storage_problems(config, workdir: str = "", init_from: bool = True) -> list[str]:
    """One line for each bucket the run would read or write that cannot be reached (no such bucket, no
    credentials, no network): the workdir, data.data_dir, the tokenizer file and (`init_from`) init_from's paths."""
    paths = {"workdir": workdir, "data.data_dir": config.data.data_dir,
             "model.text.tokenizer_path": config.model.text.get("tokenizer_path", ""),
             **(_init_from_paths(config) if init_from else {})}
    problems = []
    for key, path in paths.items():
        try:
            storage.check(path) if path else None
            if path and storage.is_url(path):
                storage.reachable(path, key)
        except (StorageError, storage.PathError) as e:
            problems.append(str(e))
    return problems


def _audio_rate_problems(config) -> list[str]:
    a = config.model.audio
    if "audio" not in tuple(config.model.towers) or config.data.name not in config_lib.AUDIO_DATASETS:
        return []
    rate = speech_triples.SAMPLE_RATE
    if a.sample_rate != rate:
        return [f"model.audio.sample_rate={a.sample_rate} does not match the {rate} Hz audio of "
                f"data.name={config.data.name!r}; set model.audio.sample_rate={rate}"]
    return []


def _init_from_paths(config) -> dict[str, str]:
    """{config key: path} of every workdir `init_from` loads: init_from.path, then init_from.more[i].path."""
    more = config.init_from.get("more", ())
    return {"init_from.path": config.init_from.path,
            **{f"init_from.more[{i}].path": dict(m).get("path", "") for i, m in enumerate(more)}}


def _init_from_problems(config) -> list[str]:
    return [f"{key}: {path!r} does not exist" for key, path in _init_from_paths(config).items()
            if path and not storage.exists(storage.absolute(path))]


def abstract_params(config) -> Any:
    """Shapes of the parameters of `config`'s model (no mesh, nothing allocated)."""
    model = build_task_model(config)
    shapes = tasks.get_task(config).dummy_batch(config, 1)

    def init(rng):
        return model.init(rng, {k: jnp.zeros(v.shape, v.dtype) for k, v in shapes.items()})['params']

    return strip_boxes(jax.eval_shape(init, jax.random.key(0)))


def trainable_problems(config) -> list[str]:
    """[problem] when the mode and `optim.freeze_rules` leave no trainable parameter, else []."""
    params = abstract_params(config)
    trainable, total = finetune.count_trainable(config, params)
    if trainable:
        return []
    return [f'finetune.mode={config.finetune.mode!r} with optim.freeze_rules={tuple(config.optim.freeze_rules)!r} '
            f'(finetune.trainable={config.finetune.trainable!r}) freezes every parameter ({total} values); '
            f'nothing would train. Change finetune.mode, or set finetune.trainable to a regex of what to train']




def _tokenizer_problems(text_cfg) -> list[str]:
    """Builds the tokenizer (reading its file): unknown name, missing file, or a vocabulary larger than the
    text embedding (model.text.vocab_size)."""
    name = text_cfg.tokenizer
    if name not in TOKENIZERS:
        return [f"model.text.tokenizer: {name!r} is unknown; choose one of {sorted(TOKENIZERS)}"]
    path = text_cfg.get("tokenizer_path", "")
    if name not in ("bytes", "byte") and path and not storage.isfile(storage.absolute(path)):
        return [f"model.text.tokenizer_path: file {path!r} (for tokenizer {name!r}) does not exist"]
    try:
        tokenizer = get_tokenizer(text_cfg)
    except ImportError as e:
        return [f"model.text.tokenizer={name!r} needs a package that is not installed: {e}"]
    except (ValueError, OSError, RuntimeError) as e:
        return [f"model.text.tokenizer={name!r}: {e}"]
    if text_cfg.vocab_size < tokenizer.vocab_size:  # get_tokenizer checks too; kept for a message naming the fix
        return [f"model.text.vocab_size={text_cfg.vocab_size} is smaller than the {name!r} tokenizer's "
                f"vocabulary ({tokenizer.vocab_size}); set model.text.vocab_size >= {tokenizer.vocab_size}"]
    return []


def _data_problems(config) -> list[str]:
    """The `data` section: the kind of data and its keys, spec files, mixture weights, data_dir."""
    d, problems = config.data, []
    kind = d.name
    if kind not in sources.DATA_KINDS:
        return [f"data.name: {kind!r} is not a kind of data; choose one of {sources.DATA_KINDS} "
                f"(a corpus of yours: 'spec' with data.spec, a prepared TFDS dataset: 'tfds' with data.tfds_name)"]
    for key, owner in (("spec", "spec"), ("tfds_name", "tfds"), ("mixture", "mixture")):
        if d[key] and kind != owner and not (key == "spec" and kind == stream.KIND):
            problems.append(f"data.{key} is set but data.name={kind!r}; set data.name={owner!r} to use it "
                            f"(or clear data.{key})")
    if kind == "spec" and not d.spec:
        problems.append("data.spec: give the path of a JSON dataset spec (or an inline JSON object) for "
                        "data.name='spec'")
    if kind == "tfds" and not d.tfds_name:
        problems.append("data.tfds_name: give the name of a TFDS dataset prepared under data.data_dir")
    if kind == stream.KIND:  # tar shards streamed in place: the spec and its shards are checked now
        problems += stream.config_problems(d)
    entries: list[tuple[str, str, float]] = []  # (key, source, weight)
    if kind == "spec" and d.spec:
        entries.append(("data.spec", d.spec, 1.0))
    if kind == "tfds" and d.tfds_name:
        entries.append(("data.tfds_name", sources.TFDS_PREFIX + d.tfds_name, 1.0))
    if kind == "mixture":
        if not d.mixture:
            problems.append("data.mixture: give ((source, weight), ...) for data.name='mixture'")
        for i, entry in enumerate(d.mixture):
            if (not isinstance(entry, (tuple, list)) or len(entry) != 2 or not isinstance(entry[0], str)
                    or isinstance(entry[1], bool) or not isinstance(entry[1], (int, float))):
                problems.append(f"data.mixture[{i}]: expected (source, weight), got {entry!r}")
                continue
            if not entry[1] > 0 or not math.isfinite(entry[1]):
                problems.append(f"data.mixture[{i}]: weight {entry[1]!r} of {entry[0]!r} must be > 0")
                continue
            entries.append((f"data.mixture[{i}]", entry[0], float(entry[1])))
        weights = [w for _, _, w in entries]
        if len(weights) == len(d.mixture) and weights and min(weights) < sum(weights) / sources.MIXTURE_BLOCK:
            problems.append(f"data.mixture: weight {min(weights)} is under 1/{sources.MIXTURE_BLOCK} of the total "
                            f"{sum(weights)}; raise it or drop that dataset")
    data_dir = config_lib.data_dir(config)
    names = []
    for key, source, weight in entries:
        try:
            member = sources.parse_source(source, weight)
            if member.kind == "spec":
                builders.normalize_spec(member.spec)
            elif not storage.isdir(storage.join(data_dir, member.tfds_name.split(":")[0])):
                problems.append(f"{key}: no prepared TFDS dataset {member.tfds_name!r} under {data_dir} "
                                f"(data.data_dir); prepare it there first (tfds build --data_dir ...)")
            names.append(member.label)
        except (ValueError, FileNotFoundError, OSError) as e:
            problems.append(f"{key}: {e}")
    if len(set(names)) != len(names):
        problems.append(f"data.mixture: a dataset appears twice ({names}); give each spec its own 'name'")
    if d.data_dir:
        if storage.isfile(data_dir):
            problems.append(f"data.data_dir: {d.data_dir!r} is a file, not a folder")
        elif not storage.isdir(data_dir) and (kind == "tfds" or any(s.startswith(sources.TFDS_PREFIX)
                                                                   for _, s, _ in entries)):
            problems.append(f"data.data_dir: folder {d.data_dir!r} does not exist (a prepared TFDS dataset is "
                            f"read from it)")
        elif not storage.is_url(data_dir) and not storage.isdir(storage.parent(data_dir)):
            problems.append(f"data.data_dir: folder {d.data_dir!r} does not exist, nor does its parent; create "
                            f"it (mmjax creates only the last level, as it does for the default cache)")
    if d.num_workers < 0:
        problems.append(f"data.num_workers must be >= 0, got {d.num_workers}")
    scale = d.crop_scale
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        problems.append(f"data.crop_scale must be (low, high) with 0 < low <= high <= 1, got {scale}")
    return problems


# Dataset (config.data.name) -> the fields its evaluation splits provide. Caption corpora ('spec', 'tfds',
