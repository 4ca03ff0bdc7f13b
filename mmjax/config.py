"""Configuration: defaults, loading `get_config(arg)` files, command-line overrides, validation.

A config is data: a locked `ml_collections.ConfigDict` whose every key exists in `base_config()`.
Config files in `configs/` start from `base_config()` and change values; a key that is not in the
defaults is a typo and is reported with the nearest valid key. `validate(config, ...)` runs before
anything compiles and reports every problem at once, each naming its key.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import math
import os
import re
from typing import Any, Sequence

import ml_collections

TASKS = ("contrastive", "classification", "itm_mlm")
FUSION_MODES = ("concat", "weighted", "gated", "xattn")  # == mmjax.models.fusion.FUSION_MODES
SPECIAL_TOKEN_IDS = (0, 1, 2)  # pad, BOS, EOT of the byte tokenizer

MESH_AXES = ("data", "fsdp", "tensor")
ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu")  # == mmjax.models.layers.ACTIVATIONS

# Logical axis name -> mesh axis (or tuple of mesh axes, or None). The vocabulary is the one every
# module uses; changing parallelism is an edit of this table, never of a model.
DEFAULT_RULES = (
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("act_joint", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("patch", None),
    ("length", None),
    ("joint", None),
    ("layers", None),
    ("channels", None),
    ("adapter", None),  # bottleneck of fine-tuning adapters (mmjax.finetune)
    ("lora", None),  # rank axis of LoRA factors
)

FINETUNE_MODES = ("none", "linear_probe", "full", "adapter", "prompt", "lora", "locked_image")  # == mmjax.finetune.MODES


class ConfigError(ValueError):
    """One or more config problems; the message lists each with its key and a fix."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid config ({len(self.problems)} problem(s)):\n{lines}")


def base_config() -> ml_collections.ConfigDict:
    """All keys mmjax knows, with defaults. Config files override values, never add keys."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.task = "contrastive"

    # Data (mmjax/data/sources.py). data.name picks the kind of data:
    #   "digits"  the embedded labelled digits (zero-shot eval works);
    #   "spec"    data.spec = path of a JSON builder spec (webdataset / img2dataset tars, CSV / TSV, COCO captions
    #             JSON; see mmjax/data/builders.py) or an inline JSON object; prepared into data_dir on first use;
    #   "tfds"    data.tfds_name = an already-prepared TFDS dataset under data_dir, read through the features
    #             data.tfds_image_key and data.tfds_caption_key ('a/b' for nested features);
    #   "mixture" data.mixture = (("a.json", 0.7), ("tfds:coco_captions", 0.3)): (source, weight) pairs, a
    #             source being a spec file, an inline JSON spec or "tfds:<name>"; weights > 0, relative; every
    #             block of 1,000 examples holds each dataset in proportion (deterministic, resumable).
    # Caption corpora have no class labels: final zero-shot eval is skipped for them (eval.zeroshot).
    c.data = ml_collections.ConfigDict()
    c.data.name = "digits"
    c.data.data_dir = ""  # "" -> $MMJAX_DATA_DIR or ~/.cache/mmjax/tfds (created on first use)
    c.data.spec = ""
    c.data.tfds_name = ""
    c.data.tfds_image_key = "image"
    c.data.tfds_caption_key = "caption"
    c.data.mixture = ()
    c.data.train_split = "train"
    c.data.num_workers = 0
    c.data.augment = True  # digits: random affine; captioned data: random-resized crop + flip (else center crop)
    c.data.crop_scale = (0.08, 1.0)  # area fraction range of the random-resized crop (captioned data)
    c.data.image_mean = (0.5, 0.5, 0.5)
    c.data.image_std = (0.5, 0.5, 0.5)
    c.data.captions = "english"  # digits caption/prompt style: 'english' | 'french' (a fine-tuning task)

    c.model = ml_collections.ConfigDict()
    m = c.model
    m.embed_dim = 64
    m.dtype = "float32"
    m.param_dtype = "float32"
    m.remat = "none"
    m.activation = "gelu"  # MLP nonlinearity: 'gelu' (exact) | 'gelu_tanh' | 'quick_gelu' (OpenAI CLIP)
    m.scan_layers = False
    m.loss = "softmax"
    m.loss_impl = "plain"  # 'plain' (B x B logits) | 'chunked' (ring over data*fsdp, memory ~ B*d)
    m.loss_chunk_size = 1024  # rows per tile of the chunked loss; must divide the per-device batch
    m.logit_scale_init = math.log(1 / 0.07)
    m.logit_scale_max = math.log(100.0)
    m.logit_bias_init = ml_collections.FieldReference(None, field_type=float)
    m.image = ml_collections.ConfigDict(
        dict(image_size=32, patch_size=4, channels=3, width=64, depth=2, num_heads=4,
             mlp_dim=256, pool="cls"))
    m.text = ml_collections.ConfigDict(
        dict(vocab_size=384, max_len=32, width=64, depth=2, num_heads=4, mlp_dim=256,
             causal=True, pool="eot", tokenizer="bytes", tokenizer_path=""))
    # Towers built (model.<name> sections used) and the modality pairs that get a contrastive loss:
    # loss = sum over pairs (a, b, weight) whose both modalities are in the batch of weight * loss(a, b).
    m.towers = ("image", "text")  # any of 'image', 'text', 'audio' (audio needs data.name='digits_speech')
    m.pairs = (("image", "text", 1.0),)
    # AudioTransformer (mmjax/models/audio.py): waveform -> log-mel (JAX) -> patches -> encoder. The defaults fit
    # the spoken digits (16 kHz, clips <= 0.81 s): max_frames * hop - 1 samples are fed (zero-padded + lengths).
    m.audio = ml_collections.ConfigDict(
        dict(sample_rate=16000, n_fft=400, hop=160, n_mels=32, max_frames=88, patch_time=8, patch_freq=8,
             width=64, depth=2, num_heads=4, mlp_dim=256, pool="cls", mel_scale="slaney", f_min=0.0,
             f_max=ml_collections.FieldReference(None, field_type=float), input_mean=-37.0, input_std=22.0))
    # task 'classification': FusionClassifier (co-attention layers, a fusion module, an MLP head).
    m.fusion = ml_collections.ConfigDict(
        dict(mode="concat", num_layers=1, num_heads=4, mlp_dim=256, hidden=128, num_classes=2,
             proj_dim=ml_collections.FieldReference(None, field_type=int), per_feature=True,
             contrastive_weight=0.0))  # > 0: + weight * CLIP loss on the towers' embeddings of matching pairs
    # task 'itm_mlm': ContrastiveModel + image-conditioned text layers with ITM and MLM heads.
    m.itm_mlm = ml_collections.ConfigDict(dict(num_layers=1, num_heads=4, mlp_dim=256, pool="eot"))

    # task 'itm_mlm': loss = contrastive + itm_weight * ITM + mlm_weight * MLM (BERT masking).
    c.objectives = ml_collections.ConfigDict(
        dict(itm_weight=1.0, mlm_weight=1.0, mask_prob=0.15, mask_id=259))

    c.optim = ml_collections.ConfigDict()
    o = c.optim
    o.lr = 1e-3
    o.end_lr_factor = 0.0
    o.warmup_steps = 50
    o.decay = "cosine"
    o.b1 = 0.9
    o.b2 = 0.98
    o.eps = 1e-6
    o.weight_decay = 0.1
    o.clip_norm = ml_collections.FieldReference(1.0, field_type=float)
    o.wd_rules = (
        (r".*(bias|scale|embedding|pos_embed|cls)", 0.0),
        (r"logit_.*", 0.0),
        (r".*(_gate|alpha_logit)", 0.0),  # fusion gates and mixing weights
        (r".*", 1.0),
    )
    o.freeze_rules = ()  # regexes of parameter paths that get no update and no optimizer state

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000
    c.train.batch_size = 64
    # Gradient accumulation inside the step (task 'contrastive'; GradCache, equal to the large-batch step):
    # k micro-batches of batch_size / k; k must divide the per-device batch batch_size / (data*fsdp).
    c.train.micro_batches = 1
    c.train.log_every = 10
    c.train.max_nonfinite_steps = 5  # stop after this many consecutive non-finite steps
    c.train.spike_factor = 3.0  # report a loss above this x its running mean (0 disables)
    c.train.spike_window = 50

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.sharding = ml_collections.ConfigDict()
    c.sharding.rules = DEFAULT_RULES

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 200
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True

    c.eval = ml_collections.ConfigDict()
    c.eval.zeroshot = True  # zero-shot top-1/top-5 against the dataset's class prompts
    c.eval.retrieval = False  # image<->text R@1/5/10 (during training; `mmjax eval` always runs it)
    c.eval.linear_probe = False  # logistic regression on frozen image features (idem)
    c.eval.every_steps = 0  # also evaluate every this many steps during training (0: only at the end)
    c.eval.batch_size = 256

    # Fine-tuning (mmjax/finetune.py): the mode adds modules to the towers and freezes parameters by regex.
    c.finetune = ml_collections.ConfigDict()
    f = c.finetune
    f.mode = "none"  # 'none' | 'linear_probe' | 'full' | 'adapter' | 'prompt' | 'lora' | 'locked_image'
    f.towers = ("image", "text")  # towers that get adapters / prompts / LoRA (any of model.towers)
    f.adapter_dim = 16  # mode 'adapter': bottleneck width
    f.prompt_len = 8  # mode 'prompt': learned tokens per tower
    f.lora_rank = 4  # mode 'lora': W + (lora_alpha / lora_rank) A B
    f.lora_alpha = 8.0
    f.lora_targets = "attn/(query|value)"  # regex on '<attn|mlp>/<query|key|value|out|fc_in|fc_out>'
    f.trainable = ""  # regex of extra parameters to train on top of the mode's (e.g. '[^/]+/head/kernel')

    # Start from another run's parameters (only when the workdir has no checkpoint of its own).
    c.init_from = ml_collections.ConfigDict()
    c.init_from.path = ""  # a workdir (with config.json and checkpoints/), or its checkpoints/ folder
    c.init_from.step = ml_collections.FieldReference(None, field_type=int)  # None: the latest
    c.init_from.include = ".*"  # regex of parameter paths to load; the others keep their fresh init
    return c


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """Imports `path` (a Python file defining `get_config(arg=None)`) and returns its locked config."""
    if ":" in path and not os.path.exists(path):
        path, arg = path.split(":", 1)
    if not os.path.isfile(path):
        raise ConfigError([f"--config: file {path!r} does not exist"])
    spec = importlib.util.spec_from_file_location("mmjax_user_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError([f"--config: {path!r} defines no get_config(arg) function"])
    config = module.get_config(arg) if arg is not None else module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError([f"--config: get_config() in {path!r} must return an ml_collections.ConfigDict"])
    return conform(config)


def conform(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Copies `config` onto `base_config()`: unknown keys are errors (with a suggestion)."""
    base = base_config()
    problems: list[str] = []
    _merge(base, config.to_dict(), "", problems)
    if problems:
        raise ConfigError(problems)
    base.lock()
    return base


def model_towers(config) -> tuple[str, ...]:
    """The towers `config`'s model has: `model.towers` for task 'contrastive', image and text otherwise."""
    if config.get("task", "contrastive") == "contrastive":
        return tuple(config.model.get("towers", ("image", "text")))
    return ("image", "text")


def load_workdir_config(workdir: str, saved: dict | None = None) -> ml_collections.ConfigDict:
    """The config of a workdir (`W/config.json`, or `saved`, e.g. the copy in a checkpoint), conformed, with a
    relative `model.text.tokenizer_path` that names a file inside the workdir made absolute (`mmjax convert`
    writes its merges file as 'bpe_merges.txt', so a workdir stays loadable after it is moved); other relative
    paths stay relative to the current directory, as when the run was started. Unlocked.

    Raises FileNotFoundError naming the workdir when it has no config.json and `saved` is None.
    """
    if saved is None:
        path = os.path.join(workdir, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{workdir!r} is not an mmjax workdir: no config.json in it")
        with open(path) as f:
            saved = json.load(f)
    config = conform(ml_collections.ConfigDict(saved))
    config.unlock()
    path = config.model.text.tokenizer_path
    inside = os.path.join(os.path.abspath(workdir), path)
    if path and not os.path.isabs(os.path.expanduser(path)) and os.path.isfile(inside):
        config.model.text.tokenizer_path = inside
    return config


def _merge(dst: ml_collections.ConfigDict, src: dict, prefix: str, problems: list[str]) -> None:
    for key, value in src.items():
        full = f"{prefix}{key}"
        if key not in dst:
            problems.append(_unknown_key_message(full, dst, prefix))
            continue
        if isinstance(dst[key], ml_collections.ConfigDict):
            if not isinstance(value, dict):
                problems.append(f"{full}: expected a section (dict), got {type(value).__name__}")
                continue
            _merge(dst[key], value, full + ".", problems)
            continue
        try:
            dst[key] = _coerce(dst[key], value, full)
        except (TypeError, ValueError) as e:
            problems.append(str(e))


def _unknown_key_message(full: str, section: ml_collections.ConfigDict, prefix: str) -> str:
    known = [f"{prefix}{k}" for k in section.keys()]
    close = difflib.get_close_matches(full, known, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; known keys here: {', '.join(sorted(known))}"
    return f"unknown config key '{full}'{hint}"


def _field_type(config: ml_collections.ConfigDict, key: str):
    ref = config.get_ref(key)
    return ref.get_type()


def _coerce(current: Any, value: Any, key: str) -> Any:
    """Returns `value` converted to the type of the default `current`, or raises naming `key`."""
    if current is None or value is None:
        return value
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        raise TypeError(f"{key}: expected true/false, got {value!r}")
    if isinstance(current, int):
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise TypeError(f"{key}: expected an integer, got {value!r}")
        return value
    if isinstance(current, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if isinstance(current, str):
        if not isinstance(value, str):
            raise TypeError(f"{key}: expected a string, got {value!r}")
        return value
    if isinstance(current, (tuple, list)):
        if not isinstance(value, (tuple, list)):
            raise TypeError(f"{key}: expected a list, got {value!r}")
        return tuple(tuple(v) if isinstance(v, list) else v for v in value)
    return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """Applies `config.a.b=value` strings (the `--config.a.b=value` flags, without the dashes).

    Values are parsed as Python literals when possible (`2`, `0.5`, `True`, `(1, 2)`), otherwise kept as
    strings. Every unknown key or wrongly-typed value is reported together.
    """
    problems: list[str] = []
    config.unlock()
    for item in overrides:
        if "=" not in item:
            problems.append(f"override {item!r}: expected --config.KEY=VALUE")
            continue
        dotted, raw = item.split("=", 1)
        dotted = dotted.removeprefix("config.")
        value = _parse_literal(raw)
        parts = dotted.split(".")
        section = config
        prefix = ""
        ok = True
        for p in parts[:-1]:
            if p not in section or not isinstance(section[p], ml_collections.ConfigDict):
                problems.append(_unknown_key_message(prefix + p, section, prefix))
                ok = False
                break
            section = section[p]
            prefix += p + "."
        if not ok:
            continue
        leaf = parts[-1]
        if leaf not in section or isinstance(section[leaf], ml_collections.ConfigDict):
            problems.append(_unknown_key_message(dotted, section, prefix))
            continue
        current = section[leaf]
        if current is None:
            ftype = _field_type(section, leaf)
            if ftype is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if raw.lower() in ("none", "null"):
                value = None
            if value is not None and ftype is not None and not isinstance(value, ftype):
                problems.append(f"{dotted}: expected {ftype.__name__}, got {raw!r}")
                continue
        elif isinstance(current, str):
            value = raw  # strings are taken verbatim: `--config.data.name=digits`
        try:
            section[leaf] = _coerce(current, value, dotted)
        except (TypeError, ValueError) as e:
            problems.append(str(e))
    config.lock()
    if problems:
        raise ConfigError(problems)
    return config


def _parse_literal(raw: str) -> Any:
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    if raw.lower() in ("none", "null"):
        return None
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


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


_DTYPES = ("float32", "bfloat16", "float16")


def validate(config: ml_collections.ConfigDict, num_devices: int, process_count: int = 1) -> tuple[int, ...]:
    """Checks everything knowable before compiling. Returns the resolved mesh shape.

    Raises ConfigError listing every problem, each naming the key and what would fix it.
    """
    problems: list[str] = []
    mesh_shape = None
    try:
        mesh_shape = resolve_mesh_shape(config.mesh, num_devices)
    except ConfigError as e:
        problems += e.problems

    t, m, o = config.train, config.model, config.optim
    if t.steps <= 0:
        problems.append(f"train.steps must be positive, got {t.steps}")
    if t.batch_size <= 0:
        problems.append(f"train.batch_size must be positive, got {t.batch_size}")
    if mesh_shape is not None and t.batch_size > 0:
        batch_shards = mesh_shape[0] * mesh_shape[1]
        if t.batch_size % batch_shards:
            problems.append(
                f"train.batch_size={t.batch_size} is not divisible by the batch-sharded mesh axes "
                f"data*fsdp={batch_shards}; use a multiple of {batch_shards}")
    k = t.micro_batches
    if k < 1:
        problems.append(f"train.micro_batches must be >= 1, got {k}")
    elif k > 1:
        if config.task != "contrastive":
            problems.append(f"train.micro_batches={k}: gradient accumulation is implemented for task "
                            f"'contrastive' only; set it to 1 for task {config.task!r}")
        if mesh_shape is not None and t.batch_size > 0:
            shards = mesh_shape[0] * mesh_shape[1]
            per_device = t.batch_size // shards if t.batch_size % shards == 0 else None
            if t.batch_size % k or (per_device is not None and per_device % k):
                problems.append(
                    f"train.micro_batches={k} does not divide the per-device batch "
                    f"{t.batch_size}/{shards} (train.batch_size / (mesh.data*mesh.fsdp)); choose a divisor of "
                    f"{per_device if per_device is not None else t.batch_size}")
    if config.eval.every_steps < 0:
        problems.append(f"eval.every_steps must be >= 0 (0: evaluate only at the end), got "
                        f"{config.eval.every_steps}")
    problems += _evaluator_problems(config)
    if t.batch_size % process_count:
        problems.append(f"train.batch_size={t.batch_size} is not divisible by the {process_count} processes")
    if config.task not in TASKS:
        problems.append(f"task: unknown task {config.task!r}; choose one of {TASKS}")
    elif config.task != "contrastive" and m.loss_impl != "plain":
        problems.append(f"model.loss_impl={m.loss_impl!r} is only supported with task 'contrastive'; "
                        f"use 'plain' for task {config.task!r}")
    if config.task == "classification":
        problems += _fusion_problems(m)
    if config.task == "itm_mlm":
        problems += _itm_mlm_problems(config)
    if m.loss not in ("softmax", "sigmoid"):
        problems.append(f"model.loss: unknown loss {m.loss!r}; choose 'softmax' or 'sigmoid'")
    if m.loss_impl not in ("plain", "chunked"):
        problems.append(f"model.loss_impl: {m.loss_impl!r}; choose 'plain' or 'chunked'")
    elif m.loss_impl == "chunked" and mesh_shape is not None and t.batch_size > 0:
        per_device = t.batch_size // (mesh_shape[0] * mesh_shape[1])
        if per_device % m.loss_chunk_size:
            problems.append(f"model.loss_chunk_size={m.loss_chunk_size} does not divide the per-device "
                            f"batch {per_device} (train.batch_size / (data*fsdp)); pick a divisor")
    for key in ("dtype", "param_dtype"):
        if m[key] not in _DTYPES:
            problems.append(f"model.{key}: {m[key]!r} is not one of {_DTYPES}")
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
    problems += _tokenizer_problems(m.text)
    if len(config.data.image_mean) != img.channels or len(config.data.image_std) != img.channels:
        problems.append(f"data.image_mean/image_std must have model.image.channels={img.channels} entries")
    if o.decay not in ("cosine", "linear", "constant"):
        problems.append(f"optim.decay: {o.decay!r}; choose 'cosine', 'linear' or 'constant'")
    if o.warmup_steps > t.steps:
        problems.append(f"optim.warmup_steps={o.warmup_steps} is longer than train.steps={t.steps}")
    if o.lr <= 0:
        problems.append(f"optim.lr must be positive, got {o.lr}")
    if t.max_nonfinite_steps <= 0:
        problems.append(f"train.max_nonfinite_steps must be positive, got {t.max_nonfinite_steps}")
    if config.checkpoint.every_steps <= 0:
        problems.append(f"checkpoint.every_steps must be positive, got {config.checkpoint.every_steps}")
    if config.checkpoint.keep <= 0:
        problems.append(f"checkpoint.keep must be positive, got {config.checkpoint.keep}")
    problems += _data_problems(config)
    problems += _pairs_problems(config) + _audio_problems(config)
    used = [a for _, axes in config.sharding.rules for a in
            ((axes,) if isinstance(axes, str) else (axes or ()))]
    for a in used:
        if a not in MESH_AXES:
            problems.append(f"sharding.rules: mesh axis {a!r} is not one of {MESH_AXES}")
    problems += _finetune_problems(config, check_params=not problems)
    if problems:
        raise ConfigError(problems)
    return mesh_shape


def _tokenizer_problems(text_cfg) -> list[str]:
    """Builds the tokenizer (reading its file): unknown name, missing file, or a vocabulary larger than the
    text embedding (model.text.vocab_size)."""
    from mmjax.data.tokenizers import TOKENIZERS, get_tokenizer
    name = text_cfg.tokenizer
    if name not in TOKENIZERS:
        return [f"model.text.tokenizer: {name!r} is unknown; choose one of {sorted(TOKENIZERS)}"]
    path = text_cfg.get("tokenizer_path", "")
    if name not in ("bytes", "byte") and path and not os.path.isfile(os.path.expanduser(path)):
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
    from mmjax.data import builders, sources
    d, problems = config.data, []
    kind = d.name
    if kind not in sources.DATA_KINDS:
        return [f"data.name: {kind!r} is not a kind of data; choose one of {sources.DATA_KINDS} "
                f"(a corpus of yours: 'spec' with data.spec, a prepared TFDS dataset: 'tfds' with data.tfds_name)"]
    for key, owner in (("spec", "spec"), ("tfds_name", "tfds"), ("mixture", "mixture")):
        if d[key] and kind != owner:
            problems.append(f"data.{key} is set but data.name={kind!r}; set data.name={owner!r} to use it "
                            f"(or clear data.{key})")
    if kind == "spec" and not d.spec:
        problems.append("data.spec: give the path of a JSON dataset spec (or an inline JSON object) for "
                        "data.name='spec'")
    if kind == "tfds" and not d.tfds_name:
        problems.append("data.tfds_name: give the name of a TFDS dataset prepared under data.data_dir")
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
    data_dir = data_dir_of(config)
    names = []
    for key, source, weight in entries:
        try:
            member = sources.parse_source(source, weight)
            if member.kind == "spec":
                builders.normalize_spec(member.spec)
            elif not os.path.isdir(os.path.join(data_dir, member.tfds_name.split(":")[0])):
                problems.append(f"{key}: no prepared TFDS dataset {member.tfds_name!r} under {data_dir} "
                                f"(data.data_dir); prepare it there first (tfds build --data_dir ...)")
            names.append(member.label)
        except (ValueError, FileNotFoundError, OSError) as e:
            problems.append(f"{key}: {e}")
    if len(set(names)) != len(names):
        problems.append(f"data.mixture: a dataset appears twice ({names}); give each spec its own 'name'")
    if d.data_dir:
        if os.path.exists(d.data_dir) and not os.path.isdir(d.data_dir):
            problems.append(f"data.data_dir: {d.data_dir!r} is a file, not a folder")
        elif not os.path.isdir(data_dir) and (kind == "tfds" or any(s.startswith(sources.TFDS_PREFIX)
                                                                   for _, s, _ in entries)):
            problems.append(f"data.data_dir: folder {d.data_dir!r} does not exist (a prepared TFDS dataset is "
                            f"read from it)")
        elif not os.path.isdir(os.path.dirname(data_dir)):
            problems.append(f"data.data_dir: folder {d.data_dir!r} does not exist, nor does its parent; create "
                            f"it (mmjax creates only the last level, as it does for the default cache)")
    if d.num_workers < 0:
        problems.append(f"data.num_workers must be >= 0, got {d.num_workers}")
    scale = d.crop_scale
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        problems.append(f"data.crop_scale must be (low, high) with 0 < low <= high <= 1, got {scale}")
    if kind != "digits" and config.task == "classification":
        problems.append(f"data.name={kind!r}: task 'classification' needs the labelled digits (data.name='digits')")
    return problems


# Dataset (config.data.name) -> the fields its evaluation splits provide. Caption corpora ('spec', 'tfds',
# 'mixture') provide none: they have no class labels, class prompts or held-out split for the evaluators.
EVAL_FIELDS = {"digits": ("image", "label", "class_prompts", "captions"),
               "digits_speech": ("image", "label", "class_prompts", "captions", "audio")}
# Evaluator (config.eval.<name>) -> the fields it needs.
EVALUATOR_NEEDS = {"zeroshot": ("image", "label", "class_prompts"), "retrieval": ("image", "captions"),
                   "linear_probe": ("image", "label")}


def _evaluator_problems(config) -> list[str]:
    """Every enabled evaluator has a dataset with the fields it needs."""
    problems = []
    if config.task == "classification":
        return problems  # evaluated on held-out pairs of its own data
    provided = EVAL_FIELDS.get(config.data.name, ())
    for name, needs in EVALUATOR_NEEDS.items():
        missing = [f for f in needs if f not in provided]
        if config.eval[name] and missing:
            problems.append(f"eval.{name}: data.name={config.data.name!r} gives this evaluator no dataset (it "
                            f"needs {', '.join(missing)}); set eval.{name}=False (caption corpora: evaluate "
                            f"their checkpoints with `mmjax eval` on a labelled dataset)")
    return problems


MODALITIES = ("image", "text", "audio")  # == mmjax.models.model.ENCODERS
AUDIO_DATASETS = tuple(n for n, fields in EVAL_FIELDS.items() if "audio" in fields)  # data.name with clips


def _pairs_problems(config) -> list[str]:
    """model.towers and model.pairs: known modalities, every pair between two built towers, weights >= 0."""
    m, problems = config.model, []
    towers = tuple(m.towers)
    unknown = [t for t in towers if t not in MODALITIES]
    if unknown or len(set(towers)) != len(towers):
        problems.append(f"model.towers: {towers!r}; list distinct modalities among {MODALITIES}")
    if config.task != "contrastive":
        if towers != ("image", "text") or tuple(tuple(p) for p in m.pairs) != (("image", "text", 1.0),):
            problems.append(f"model.towers / model.pairs: task {config.task!r} uses the image and text towers "
                            f"only; keep model.towers=('image', 'text') and model.pairs=(('image', 'text', 1.0),)")
        return problems
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
    else:
        from mmjax.data import speech_triples
        rate = speech_triples.SAMPLE_RATE
        if a.sample_rate != rate:
            problems.append(f"model.audio.sample_rate={a.sample_rate} does not match the {rate} Hz audio of "
                            f"data.name={config.data.name!r}; set model.audio.sample_rate={rate}")
    if "image" not in tuple(m.towers):
        for name in ("retrieval", "linear_probe"):
            if config.eval[name]:
                problems.append(f"eval.{name} evaluates the image tower, which model.towers={tuple(m.towers)!r} "
                                f"lacks; set eval.{name}=False")
    return problems


def _fusion_problems(m) -> list[str]:
    f, problems = m.fusion, []
    if f.mode not in FUSION_MODES:
        problems.append(f"model.fusion.mode: {f.mode!r}; choose one of {FUSION_MODES}")
    if f.num_classes <= 0:
        problems.append(f"model.fusion.num_classes must be positive, got {f.num_classes}")
    elif f.num_classes < 2:
        problems.append(f"model.fusion.num_classes={f.num_classes}: the image-caption pairs have labels 0/1; "
                        f"use >= 2")
    for key in ("num_layers", "hidden", "mlp_dim", "num_heads"):
        if f[key] < (0 if key == "num_layers" else 1):
            problems.append(f"model.fusion.{key} must be positive, got {f[key]}")
    if f.num_heads >= 1:
        for tower in ("image", "text"):
            if m[tower].width % f.num_heads:
                problems.append(f"model.{tower}.width={m[tower].width} is not divisible by "
                                f"model.fusion.num_heads={f.num_heads}")
    if f.contrastive_weight < 0:
        problems.append(f"model.fusion.contrastive_weight must be >= 0, got {f.contrastive_weight}")
    if f.proj_dim is not None and f.proj_dim <= 0:
        problems.append(f"model.fusion.proj_dim must be positive or None, got {f.proj_dim}")
    if (f.mode in ("concat", "weighted", "gated") and f.proj_dim is None
            and m.image.width != m.text.width):
        problems.append(f"model.fusion.mode={f.mode!r} fuses pooled features of mismatched widths "
                        f"model.text.width={m.text.width} and model.image.width={m.image.width}; set "
                        f"model.fusion.proj_dim to project both to one width (or make the widths equal)")
    return problems


def _finetune_problems(config, check_params: bool = True) -> list[str]:
    """Problems of `config.finetune` and `config.init_from`. With `check_params` (the rest of the config is
    sound), also a mode whose rules freeze every parameter, checked on the model's abstract parameter tree."""
    f, problems = config.finetune, []
    if f.mode not in FINETUNE_MODES:
        problems.append(f"finetune.mode: unknown mode {f.mode!r}; choose one of {FINETUNE_MODES}")
    elif f.mode != "none" and config.task != "contrastive":
        problems.append(f"finetune.mode={f.mode!r} is only supported with task 'contrastive' "
                        f"(got task {config.task!r}); use finetune.mode='none'")
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
    i = config.init_from
    if i.path and not os.path.exists(os.path.expanduser(i.path)):
        problems.append(f"init_from.path: {i.path!r} does not exist")
    if i.step is not None and i.step < 0:
        problems.append(f"init_from.step must be >= 0 or None (latest), got {i.step}")
    if check_params and not problems and (f.mode != "none" or config.optim.freeze_rules):
        from mmjax import finetune  # needs the models; imported here to keep this module light
        try:
            problems += finetune.trainable_problems(config)
        except ValueError as e:
            problems.append(str(e))
    return problems


def _itm_mlm_problems(config) -> list[str]:
    m, o, problems = config.model, config.objectives, []
    h = m.itm_mlm
    if h.num_layers < 1:
        problems.append(f"model.itm_mlm.num_layers must be positive, got {h.num_layers}")
    if h.num_heads < 1 or m.text.width % h.num_heads:
        problems.append(f"model.text.width={m.text.width} is not divisible by "
                        f"model.itm_mlm.num_heads={h.num_heads}")
    if h.pool not in ("eot", "cls"):
        problems.append(f"model.itm_mlm.pool: {h.pool!r}; choose 'eot' or 'cls'")
    if not 0 <= o.mask_id < m.text.vocab_size:
        problems.append(f"objectives.mask_id={o.mask_id} must be < model.text.vocab_size="
                        f"{m.text.vocab_size} (and >= 0)")
    elif o.mask_id in SPECIAL_TOKEN_IDS or (m.text.tokenizer == "bytes" and 3 <= o.mask_id < 259):
        problems.append(f"objectives.mask_id={o.mask_id} is a token the tokenizer emits; use an id in "
                        f"[259, model.text.vocab_size)")
    if not 0.0 < o.mask_prob <= 1.0:
        problems.append(f"objectives.mask_prob must be in (0, 1], got {o.mask_prob}")
    for key in ("itm_weight", "mlm_weight"):
        if o[key] < 0:
            problems.append(f"objectives.{key} must be >= 0, got {o[key]}")
    if config.train.batch_size < 2:
        problems.append("train.batch_size must be >= 2 for task 'itm_mlm' (ITM negatives come from the batch)")
    return problems


def data_dir_of(config) -> str:
    """Where TFDS datasets are prepared and read (the same as `data_dir`)."""
    return data_dir(config)


def data_dir(config) -> str:
    """Where TFDS datasets are prepared and read."""
    if config.data.data_dir:
        return os.path.abspath(os.path.expanduser(config.data.data_dir))
    return os.environ.get("MMJAX_DATA_DIR", os.path.expanduser("~/.cache/mmjax/tfds"))
