"""Validation that needs no files: every problem knowable from the config and the device count alone.

`validate(config, num_devices, process_count)` reports every problem at once, each naming its key and what
would fix it. The task's own checks (`mmjax.tasks`) and the checks that read files (tokenizers, data specs,
checkpoints: `mmjax.training.preflight`) run on top of it, before anything compiles.
"""

from __future__ import annotations

import math
import re

import ml_collections

from mmjax.config.defaults import (
    ACTIVATIONS,
    AUDIO_DATASETS,
    DTYPES,
    EVAL_FIELDS,
    EVALUATOR_NEEDS,
    FINETUNE_MODES,
    MESH_AXES,
    MODALITIES,
    model_towers,
)
from mmjax.errors import ConfigError


def resolve_mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
    """Axis sizes for (data, fsdp, tensor); one -1 takes "the rest". Raises ConfigError if impossible."""
    sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
    problems = []
    if sum(s == -1 for s in sizes) > 1:
        problems.append("mesh: at most one of mesh.data/fsdp/tensor may be -1 ('the rest')")
    if any(s == 0 or s < -1 for s in sizes):
        problems.append(f"mesh: axis sizes must be positive or -1, got "
                        f"{dict(zip(MESH_AXES, sizes))}")
    if problems:
        raise ConfigError(problems)
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError([f"mesh: fixed axes {dict(zip(MESH_AXES, sizes))} (product {known}) do not "
                               f"divide the {num_devices} devices"])
        sizes = [num_devices // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != num_devices:
        raise ConfigError([f"mesh: mesh.data*mesh.fsdp*mesh.tensor = {math.prod(sizes)} but there are "
                           f"{num_devices} devices; set the sizes so their product is {num_devices} "
                           f"(or make one of them -1)"])
    return tuple(sizes)



def validate(config: ml_collections.ConfigDict, num_devices: int, process_count: int = 1) -> tuple[int, ...]:
    """Checks everything knowable before compiling without reading files. Returns the resolved mesh shape.

    Raises ConfigError listing every problem, each naming the key and what would fix it.
    """
    problems: list[str] = []
    mesh_shape = None
    try:
        mesh_shape = resolve_mesh_shape(config.mesh, num_devices)
    except ConfigError as e:
        problems += e.problems
    problems += _batch_problems(config, mesh_shape, process_count) + _model_problems(config, mesh_shape)
    problems += _run_problems(config) + _towers_problems(config) + _audio_problems(config)
    problems += _finetune_problems(config)
    if problems:
        raise ConfigError(problems)
    return mesh_shape


def _batch_shards(mesh_shape) -> int | None:
    return None if mesh_shape is None else mesh_shape[0] * mesh_shape[1]


def _batch_problems(config, mesh_shape, process_count: int) -> list[str]:
    """train.batch_size and train.micro_batches against the batch-sharded devices and the processes."""
    t, problems, shards = config.train, [], _batch_shards(mesh_shape)
    if t.batch_size <= 0:
        problems.append(f"train.batch_size must be positive, got {t.batch_size}")
    elif shards is not None and t.batch_size % shards:
        problems.append(f"train.batch_size={t.batch_size} is not divisible by the batch-sharded mesh axes "
                        f"data*fsdp={shards}; use a multiple of {shards}")
    k = t.micro_batches
    if k < 1:
        problems.append(f"train.micro_batches must be >= 1, got {k}")
    elif k > 1 and shards is not None and t.batch_size > 0:
        per_device = t.batch_size // shards if t.batch_size % shards == 0 else None
        if t.batch_size % k or (per_device is not None and per_device % k):
            problems.append(
                f"train.micro_batches={k} does not divide the per-device batch "
                f"{t.batch_size}/{shards} (train.batch_size / (mesh.data*mesh.fsdp)); choose a divisor of "
                f"{per_device if per_device is not None else t.batch_size}")
    if t.batch_size % process_count:
        problems.append(f"train.batch_size={t.batch_size} is not divisible by the {process_count} processes")
    return problems


def _model_problems(config, mesh_shape) -> list[str]:
    """model.*: loss, dtypes, activation, remat, image and text tower shapes, image normalisation."""
    m, t, problems = config.model, config.train, []
    if m.loss not in ("softmax", "sigmoid"):
        problems.append(f"model.loss: unknown loss {m.loss!r}; choose 'softmax' or 'sigmoid'")
    if m.loss_impl not in ("plain", "chunked"):
        problems.append(f"model.loss_impl: {m.loss_impl!r}; choose 'plain' or 'chunked'")
    elif m.loss_impl == "chunked" and mesh_shape is not None and t.batch_size > 0:
        per_device = t.batch_size // _batch_shards(mesh_shape)
        if per_device % m.loss_chunk_size:
            problems.append(f"model.loss_chunk_size={m.loss_chunk_size} does not divide the per-device "
                            f"batch {per_device} (train.batch_size / (data*fsdp)); pick a divisor")
    for key in ("dtype", "param_dtype"):
        if m[key] not in DTYPES:
            problems.append(f"model.{key}: {m[key]!r} is not one of {DTYPES}")
    if m.activation not in ACTIVATIONS:
        problems.append(f"model.activation: {m.activation!r}; choose one of {ACTIVATIONS}")
    if m.remat not in ("none", "full", "dots"):
        problems.append(f"model.remat: {m.remat!r}; choose 'none', 'full' or 'dots'")
    img = m.image
    if img.image_size % img.patch_size:
        problems.append(f"model.image.image_size={img.image_size} is not divisible by "
                        f"model.image.patch_size={img.patch_size}")
    if img.pool not in ("cls", "mean"):
        problems.append(f"model.image.pool: {img.pool!r}; choose 'cls' or 'mean'")
    if m.text.pool not in ("eot", "cls"):
        problems.append(f"model.text.pool: {m.text.pool!r}; choose 'eot' or 'cls'")
    for tower in ("image", "text"):
        sec = m[tower]
        if sec.width % sec.num_heads:
            problems.append(f"model.{tower}.width={sec.width} is not divisible by "
                            f"model.{tower}.num_heads={sec.num_heads}")
    if len(config.data.image_mean) != img.channels or len(config.data.image_std) != img.channels:
        problems.append(f"data.image_mean/image_std must have model.image.channels={img.channels} entries")
    return problems


def _run_problems(config) -> list[str]:
    """optim, the step counts and intervals of train / eval / checkpoint, and sharding.rules."""
    t, o, problems = config.train, config.optim, []
    if t.steps <= 0:
        problems.append(f"train.steps must be positive, got {t.steps}")
    if o.decay not in ("cosine", "linear", "constant"):
        problems.append(f"optim.decay: {o.decay!r}; choose 'cosine', 'linear' or 'constant'")
    if o.warmup_steps > t.steps:
        problems.append(f"optim.warmup_steps={o.warmup_steps} is longer than train.steps={t.steps}")
    if o.lr <= 0:
        problems.append(f"optim.lr must be positive, got {o.lr}")
    for key, value in (("train.log_every", t.log_every), ("train.max_nonfinite_steps", t.max_nonfinite_steps),
                       ("checkpoint.every_steps", config.checkpoint.every_steps),
                       ("checkpoint.keep", config.checkpoint.keep)):
        if value <= 0:
            problems.append(f"{key} must be positive, got {value}")
    for template in tuple(config.eval.get("zeroshot_templates", ()) or ()):
        if not isinstance(template, str) or template.count("{}") != 1:
            problems.append(f"eval.zeroshot_templates: each template needs exactly one '{{}}' for the class name; "
                            f"got {template!r}")
    if config.eval.every_steps < 0:
        problems.append(f"eval.every_steps must be >= 0 (0: evaluate only at the end), got "
                        f"{config.eval.every_steps}")
    used = [a for _, axes in config.sharding.rules for a in ((axes,) if isinstance(axes, str) else (axes or ()))]
    for a in used:
        if a not in MESH_AXES:
            problems.append(f"sharding.rules: mesh axis {a!r} is not one of {MESH_AXES}")
    return problems


def evaluator_problems(config) -> list[str]:
    """Every evaluator enabled in `config.eval` has a dataset with the fields it needs (for the tasks whose
    evaluation runs them)."""
    problems = []
    provided = EVAL_FIELDS.get(config.data.name, ())
    for name, needs in EVALUATOR_NEEDS.items():
        missing = [f for f in needs if f not in provided]
        if config.eval[name] and missing:
            problems.append(f"eval.{name}: data.name={config.data.name!r} gives this evaluator no dataset (it "
                            f"needs {', '.join(missing)}); set eval.{name}=False (caption corpora: evaluate "
                            f"their checkpoints with `mmjax eval` on a labelled dataset)")
    return problems



def _towers_problems(config) -> list[str]:
    """model.towers: distinct known modalities."""
    towers = tuple(config.model.towers)
    if [t for t in towers if t not in MODALITIES] or len(set(towers)) != len(towers):
        return [f"model.towers: {towers!r}; list distinct modalities among {MODALITIES}"]
    return []


def pairs_problems(config) -> list[str]:
    """model.pairs of a contrastive model: at least two towers, every pair between two built towers, weights >= 0,
    not all 0."""
    m, problems = config.model, []
    towers = tuple(m.towers)
    if len(towers) < 2:
        problems.append(f"model.towers: {towers!r}; a contrastive model needs at least two towers")
    if not m.pairs:
        problems.append("model.pairs: give at least one (modality_a, modality_b, weight)")
    for i, pair in enumerate(m.pairs):
        if (not isinstance(pair, (tuple, list)) or len(pair) != 3 or not all(isinstance(x, str) for x in pair[:2])
                or isinstance(pair[2], bool) or not isinstance(pair[2], (int, float))):
            problems.append(f"model.pairs[{i}]: expected (modality_a, modality_b, weight), got {pair!r}")
            continue
        a, b, weight = pair
        for name in (a, b):
            if name not in towers:
                problems.append(f"model.pairs[{i}]={tuple(pair)!r}: the model has no encoder for {name!r} "
                                f"(model.towers={towers!r}); add it to model.towers or drop the pair")
        if a == b:
            problems.append(f"model.pairs[{i}]={tuple(pair)!r}: pair two different modalities")
        if not weight >= 0 or not math.isfinite(weight):
            problems.append(f"model.pairs[{i}]: weight {weight!r} of ({a!r}, {b!r}) must be >= 0")
    if m.pairs and all(isinstance(p, (tuple, list)) and len(p) == 3 and isinstance(p[2], (int, float))
                       and p[2] == 0 for p in m.pairs):
        problems.append("model.pairs: every weight is 0; give at least one pair a positive weight")
    return problems


def _audio_problems(config) -> list[str]:
    """model.audio (when 'audio' is a tower): shapes, and the sample rate against the dataset's."""
    m, problems = config.model, []
    if "audio" not in tuple(m.towers):
        return problems
    a = m.audio
    for key in ("sample_rate", "n_fft", "hop", "n_mels", "max_frames", "patch_time", "patch_freq", "width",
                "depth", "num_heads", "mlp_dim"):
        if a[key] <= 0:
            problems.append(f"model.audio.{key} must be positive, got {a[key]}")
    if a.n_mels > 0 and a.patch_freq > 0 and a.n_mels % a.patch_freq:
        problems.append(f"model.audio.n_mels={a.n_mels} is not divisible by model.audio.patch_freq={a.patch_freq}")
    if a.num_heads > 0 and a.width % a.num_heads:
        problems.append(f"model.audio.width={a.width} is not divisible by model.audio.num_heads={a.num_heads}")
    if a.pool not in ("cls", "mean"):
        problems.append(f"model.audio.pool: {a.pool!r}; choose 'cls' or 'mean'")
    if a.mel_scale not in ("slaney", "htk"):
        problems.append(f"model.audio.mel_scale: {a.mel_scale!r}; choose 'slaney' or 'htk'")
    if config.data.name not in AUDIO_DATASETS:
        problems.append(f"model.towers includes 'audio' but data.name={config.data.name!r} has no audio; use "
                        f"data.name in {AUDIO_DATASETS}")
    if "image" not in tuple(m.towers):
        for name in ("retrieval", "linear_probe"):
            if config.eval[name]:
                problems.append(f"eval.{name} evaluates the image tower, which model.towers={tuple(m.towers)!r} "
                                f"lacks; set eval.{name}=False")
    return problems


def _finetune_problems(config) -> list[str]:
    """Problems of `config.finetune`, `data.captions` and `config.init_from` knowable without files (the
    parameters a mode leaves trainable and init_from's checkpoint are checked by `mmjax.training.preflight`)."""
    f, problems = config.finetune, []
    if f.mode not in FINETUNE_MODES:
        problems.append(f"finetune.mode: unknown mode {f.mode!r}; choose one of {FINETUNE_MODES}")
    towers = model_towers(config)
    bad_towers = [t for t in f.towers if t not in towers]
    if f.mode in ("adapter", "prompt", "lora") and (bad_towers or not f.towers):  # the modes that add modules
        problems.append(f"finetune.towers: {tuple(f.towers)!r}; list one or more of the model's towers "
                        f"{towers} (model.towers)")
    if f.mode == "locked_image" and "image" not in towers:
        problems.append(f"finetune.mode='locked_image' locks the image tower, but the model has none "
                        f"(model.towers={towers}); freeze a tower with optim.freeze_rules, e.g. ['audio/.*']")
    for key in ("adapter_dim", "prompt_len", "lora_rank"):
        if f[key] <= 0:
            problems.append(f"finetune.{key} must be positive, got {f[key]}")
    if f.lora_alpha <= 0:
        problems.append(f"finetune.lora_alpha must be positive, got {f.lora_alpha}")
    for key, pattern in (("finetune.lora_targets", f.lora_targets), ("finetune.trainable", f.trainable),
                         ("init_from.include", config.init_from.include)):
        try:
            re.compile(pattern)
        except re.error as e:
            problems.append(f"{key}: invalid regex {pattern!r}: {e}")
    if config.data.captions not in ("english", "french"):
        problems.append(f"data.captions: {config.data.captions!r}; choose 'english' or 'french'")
    elif config.data.captions != "english" and config.data.name != "digits":
        problems.append(f"data.captions={config.data.captions!r} is a caption style of the digits; "
                        f"it needs data.name='digits' (got {config.data.name!r})")
    if config.init_from.step is not None and config.init_from.step < 0:
        problems.append(f"init_from.step must be >= 0 or None (latest), got {config.init_from.step}")
    problems += _init_from_source_problems(config.init_from)
    return problems


def _rename_problems(key: str, rename) -> list[str]:
    problems = []
    for pair in tuple(rename or ()):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            problems.append(f"{key}: each entry is a (regex, replacement) pair of strings; got {pair!r}")
            continue
        try:
            re.compile(pair[0])
        except re.error as e:
            problems.append(f"{key}: invalid regex {pair[0]!r}: {e}")
    return problems


def _init_from_source_problems(f) -> list[str]:
    """init_from.rename and each init_from.more source (a dict: path, and optional step, include, rename)."""
    problems = _rename_problems("init_from.rename", f.get("rename", ()))
    for i, more in enumerate(tuple(f.get("more", ()) or ())):
        key = f"init_from.more[{i}]"
        if not hasattr(more, "keys") or not more.get("path"):
            problems.append(f"{key}: each extra source is a dict with a 'path' (and optional 'step', 'include', "
                            f"'rename'); got {more!r}")
            continue
        unknown = sorted(set(more.keys()) - {"path", "step", "include", "rename"})
        if unknown:
            problems.append(f"{key}: unknown keys {unknown}; use path, step, include, rename")
        try:
            re.compile(more.get("include", ".*"))
        except re.error as e:
            problems.append(f"{key}.include: invalid regex {more.get('include')!r}: {e}")
        problems += _rename_problems(f"{key}.rename", more.get("rename", ()))
    return problems


def check_sample_rate(sample_rate: int, expected: int) -> None:
    """ValueError unless `sample_rate` equals the front end's `expected` rate."""
    if int(sample_rate) != int(expected):
        raise ValueError(f'audio has sample rate {sample_rate} Hz but the front end expects {expected} Hz '
                         f'(config model.audio.sample_rate); resample it first, e.g. '
                         f'mmjax.data.audio.resample(waveform, {sample_rate}, {expected})')
