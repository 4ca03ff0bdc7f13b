"""Task 'mdm': BEiT-3's masked data modelling on a multiway transformer (`mmjax.models.multiway`).

Every training example (an image and its caption) gives three passes, each weighted in `model.mdm`:
  - image ('image_weight'): about `image_mask_ratio` of the patches masked blockwise (BEiT's block masking,
    `block_mask`), predicting the codes of the frozen VQ image tokenizer at the masked patches (vision-only path);
  - text ('text_weight'): BERT masking of `text_mask_ratio` of the caption tokens (language-only path);
  - pair ('pair_weight'): `pair_text_mask_ratio` of the caption tokens masked, predicted from the caption and
    the whole image (vision-language path): `pair_word_mask_prob` of the captions by whole words (`whole_word_mask`, BEiT-3-style span masking; the class names and numerals
    always among them, so the number word is hidden entirely and only the image tells it), the others by BERT
    masking of single tokens.
Optionally `contrastive_weight` x the CLIP loss of the image and text passes' embeddings (0 by default, as in
BEiT-3's pretraining); a pass without a masked loss is unmasked, so `contrastive_weight` alone is the dual
encoder's contrastive fine-tuning. Masks draw from `jax.random.fold_in(key(config.seed), step)`, one key per example, so a step's
randomness does not depend on the mesh. Step metrics per part: '<part>_loss', '<part>_acc' (masked-token
accuracy) and '<part>_baseline_acc' (the share of the batch's most frequent masked target: what the best constant
predictor of that batch scores), parts 'mim', 'mlm' and 'pair_mlm'.

The image tokenizer is the 'encoder' and 'quantizer' of the task 'vq' workdir `image_tokenizer.workdir`, inside
the model: `prepare` (what `mmjax train` runs first) makes `init_from` load them from there and `optim.freeze_rules`
freeze them, training a tokenizer first in <workdir>/tokenizer when `image_tokenizer.workdir` is empty; the
checks run before compiling (`config_problems`), and every checkpoint carries the tokenizer.

Evaluation: the dual encoder (vision-only and language-only paths, `encode_image` / `encode_text`) through the
contrastive evaluators enabled in `config.eval`; with the linear probe, the same probe on the same architecture at
random init (`random_init_probe`, 'linear_probe/random_init/...', also in `mmjax eval`); and held-out masked
accuracy of the three parts on the test split with fixed masks against the best constant predictor of those
targets ('mdm/...'); and whether the model reads the digit (`digit_word_eval`: the whole number word masked,
the class is the most likely of the ten words, with the image, another image and no image; 'mdm/digit_word_...').
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mmjax import storage
from mmjax.config import SPECIAL_TOKEN_IDS, validation
from mmjax.data import pipeline
from mmjax.data.tokenizers import get_tokenizer
from mmjax.errors import ConfigError
from mmjax.eval.encoder import TowerEncoder, batched_apply
from mmjax.eval.linear_probe import linear_probe_eval
from mmjax.losses import contrastive as contrastive_losses
from mmjax.losses import fusion as objectives
from mmjax.models.multiway import build_multiway_model
from mmjax.runtime.flops import encoder_forward_flops
from mmjax.tasks.base import Task, image_text_only_problems
from mmjax.tasks.contrastive import contrastive_evals
from mmjax.tasks.mdm_words import EVAL_SEED, digit_word_eval, keywords_of, whole_word_mask
from mmjax.tasks.vq import tokenizer_config, use_image_tokenizer

MIN_ASPECT = 0.3  # BEiT: block aspect ratios log-uniform in [0.3, 1/0.3]
# Where `block_mask` gives up adding blocks: this many tries per patch of the grid (plus a few).
ATTEMPTS_PER_PATCH, MIN_ATTEMPTS = 2, 16
# The image tokenizer's parameters in the model (names of a task 'vq' workdir): init_from loads them, optim.freeze_rules
# freeze them.
TOKENIZER_REGEX = r"(encoder|quantizer)/.*"
TOKENIZER_PARAMS = ("encoder/conv_in/kernel", "quantizer/embedding")


def grid_side(config) -> int:
    """Patches per side of the image grid."""
    return int(config.model.image.image_size) // int(config.model.image.patch_size)


def masked_patches(config) -> int:
    """Patches `block_mask` masks per image: round(image_mask_ratio x N), at least 1."""
    return max(1, round(float(config.model.mdm.image_mask_ratio) * grid_side(config) ** 2))


def _one_block_mask(key: jax.Array, side: int, target: int, min_block: int,
                    attempts: int) -> tuple[jax.Array, jax.Array]:
    """One image's mask (see `block_mask`): bool [side, side], blocks int32 [attempts, 4]."""
    rows, cols = jnp.arange(side)[:, None], jnp.arange(side)[None, :]

    def attempt(i, carry):
        mask, blocks = carry
        k_area, k_aspect, k_top, k_left = jax.random.split(jax.random.fold_in(key, i), 4)
        remaining = target - jnp.sum(mask)
        low = jnp.minimum(min_block, remaining).astype(jnp.float32)
        area = jax.random.uniform(k_area, (), minval=low, maxval=jnp.maximum(remaining, 1).astype(jnp.float32))
        aspect = jnp.exp(jax.random.uniform(k_aspect, (), minval=math.log(MIN_ASPECT),
                                            maxval=-math.log(MIN_ASPECT)))
        h = jnp.clip(jnp.round(jnp.sqrt(area * aspect)), 1, side).astype(jnp.int32)
        w = jnp.clip(jnp.round(jnp.sqrt(area / aspect)), 1, side).astype(jnp.int32)
        top = jax.random.randint(k_top, (), 0, side - h + 1)
        left = jax.random.randint(k_left, (), 0, side - w + 1)
        block = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
        new = jnp.sum(block & ~mask)
        take = (new > 0) & (new <= remaining)
        blocks = blocks.at[i].set(jnp.where(take, jnp.stack([top, left, h, w]), 0).astype(jnp.int32))
        return mask | (block & take), blocks

    init = (jnp.zeros((side, side), bool), jnp.zeros((attempts, 4), jnp.int32))
    return jax.lax.fori_loop(0, attempts, attempt, init)


def block_mask(keys: jax.Array, side: int, target: int, min_block: int) -> tuple[jax.Array, jax.Array]:
    """BEiT's blockwise masking of a side x side patch grid, one mask per key of `keys` [B].

    Rectangles are added one at a time, each of area uniform in [min(min_block, r), r] (r: patches still to
    mask) and aspect ratio log-uniform in [0.3, 1/0.3], at a uniform position; a rectangle is kept when it masks
    at least one new patch and at most r. Near the end the areas shrink to what is left, so the count reaches
    `target` (up to `ATTEMPTS_PER_PATCH` tries per patch) and never exceeds it.

    Returns (mask bool [B, side * side], row-major, True = masked; blocks int32 [B, K, 4]: the kept rectangles
    (top, left, height, width), zero rows for rejected tries; the mask is exactly their union).
    """
    attempts = MIN_ATTEMPTS + ATTEMPTS_PER_PATCH * side * side
    masks, blocks = jax.vmap(lambda k: _one_block_mask(k, side, target, min_block, attempts))(keys)
    return masks.reshape(keys.shape[0], side * side), blocks


def mode_fraction(targets: jax.Array, weights: jax.Array, num_classes: int) -> jax.Array:
    """Share of the most frequent target among the weighted positions: targets int [...] in [0, num_classes),
    weights [...] -> float32 [] (0 without weight). The accuracy of the best constant prediction."""
    counts = jnp.zeros((num_classes,), jnp.float32).at[targets.ravel()].add(weights.ravel().astype(jnp.float32))
    return jnp.max(counts) / jnp.maximum(jnp.sum(counts), 1.0)


def masked_loss(name: str, logits: jax.Array, targets: jax.Array, weights: jax.Array) -> tuple[jax.Array, dict]:
    """`objectives.mlm_loss` of logits [B,L,V], targets int [B,L], weights [B,L] as '<name>_loss', '<name>_acc',
    '<name>_count', plus '<name>_baseline_acc' (`mode_fraction`)."""
    loss, m = objectives.mlm_loss(logits, targets, weights)
    return loss, {f"{name}_loss": loss, f"{name}_acc": m["mlm_acc"], f"{name}_count": m["mlm_count"],
                  f"{name}_baseline_acc": mode_fraction(targets, weights, logits.shape[-1])}


def loss_parts(mdm) -> tuple[str, ...]:
    """The passes with a masked loss of positive weight (their inputs are masked)."""
    weights = {"image": mdm.image_weight, "text": mdm.text_weight, "pair": mdm.pair_weight}
    return tuple(p for p, w in weights.items() if float(w) > 0)


def active_parts(mdm) -> tuple[str, ...]:
    """The passes a step runs: `loss_parts`, and with a contrastive weight the image and text passes (unmasked
    when they have no masked loss: the dual encoder's contrastive fine-tuning)."""
    extra = ("image", "text") if float(mdm.contrastive_weight) > 0 else ()
    return tuple(p for p in ("image", "text", "pair") if p in loss_parts(mdm) + extra)


def mask_inputs(config, batch: dict, key: jax.Array, parts: tuple[str, ...]) -> tuple[dict, dict]:
    """The model inputs with the masks of the passes `parts` drawn from `key`, one key per example: (inputs,
    targets) with targets {'image_mask' bool [B,N], 'text' / 'pair': (targets int32 [B,L], weights float32 [B,L])}.
    The pair pass masks `pair_word_mask_prob` of the captions by whole words (`whole_word_mask`), the others by
    tokens, both at `pair_text_mask_ratio`."""
    d, o, vocab = config.model.mdm, config.objectives, int(config.model.text.vocab_size)
    text = batch["text"]
    keys = jax.random.split(key, (5, text.shape[0]))
    inputs, targets = {"image": batch["image"], "text": text}, {}

    def bert(keys_, ratio):
        one = lambda k, t: objectives.mask_tokens(t[None], k, float(ratio), int(o.mask_id), vocab)  # noqa: E731
        masked, tgt, w = jax.vmap(one)(keys_, text)
        return masked[:, 0], (tgt[:, 0], w[:, 0])

    if "image" in parts:
        mask, _ = block_mask(keys[0], grid_side(config), masked_patches(config), int(d.min_block_patches))
        inputs["image_mask"] = targets["image_mask"] = mask
    if "text" in parts:
        inputs["mlm_text"], targets["text"] = bert(keys[1], d.text_mask_ratio)
    if "pair" in parts:
        masked, (tgt, w) = bert(keys[2], d.pair_text_mask_ratio)
        word_prob = float(d.pair_word_mask_prob)
        if word_prob > 0:
            bytes_text, keywords = str(config.model.text.tokenizer) == "bytes", keywords_of(config)
            one = lambda k, t: whole_word_mask(k, t, float(d.pair_text_mask_ratio), int(o.mask_id), vocab,  # noqa: E731
                                               bytes_text, keywords)
            w_masked, w_tgt, w_w = jax.vmap(one)(keys[3], text)
            use = (jax.vmap(lambda k: jax.random.uniform(k))(keys[4]) < word_prob)[:, None]
            masked, tgt, w = (jnp.where(use, a, b) for a, b in ((w_masked, masked), (w_tgt, tgt), (w_w, w)))
        inputs["pair_text"], targets["pair"] = masked, (tgt, w)
    return inputs, targets


def mdm_loss(config, outputs: dict, targets: dict, parts: tuple[str, ...]) -> tuple[jax.Array, dict]:
    """The weighted sum of the masked losses of `parts` (`loss_parts`; the contrastive loss when its weight is
    positive) with every part's metrics."""
    d = config.model.mdm
    total, metrics = jnp.zeros((), jnp.float32), {}
    if "image" in parts:
        loss, m = masked_loss("mim", outputs["mim_logits"], outputs["image_codes"], targets["image_mask"])
        total, metrics = total + float(d.image_weight) * loss, {**metrics, **m}
    for part, name, logits, weight in (("text", "mlm", "mlm_logits", d.text_weight),
                                       ("pair", "pair_mlm", "pair_logits", d.pair_weight)):
        if part in parts:
            loss, m = masked_loss(name, outputs[logits], *targets[part])
            total, metrics = total + float(weight) * loss, {**metrics, **m}
    if float(d.contrastive_weight) > 0:
        loss, m = contrastive_losses.contrastive_loss(outputs, "softmax")
        total = total + float(d.contrastive_weight) * loss
        metrics.update(contrastive_loss=loss, i2t_acc=m["i2t_acc"], t2i_acc=m["t2i_acc"])
    metrics.update(loss=total, logit_scale=outputs["logit_scale"])
    return total, metrics


def mdm_objective(config):
    """objective(model, params, batch, step) -> (loss, metrics) of the masked data modelling (module docstring)."""
    seed, parts, masked = int(config.seed), active_parts(config.model.mdm), loss_parts(config.model.mdm)

    def objective(model, params, batch, step):
        inputs, targets = mask_inputs(config, batch, jax.random.fold_in(jax.random.key(seed), step), masked)
        outputs = model.apply({"params": params}, inputs, train=True, parts=parts)
        return mdm_loss(config, outputs, targets, masked)

    return objective


def _eval_fn(model: nn.Module):
    def score(p, batch):
        out = model.apply({"params": p}, batch, parts=("image", "text", "pair"))
        other = dict(batch, image=jnp.roll(batch["image"], 1, axis=0))  # each caption with another image
        mismatched = model.apply({"params": p}, other, parts=("pair",))["pair_logits"]
        return {"codes": out["image_codes"], "mim": jnp.argmax(out["mim_logits"], -1),
                "mlm": jnp.argmax(out["mlm_logits"], -1), "pair_mlm": jnp.argmax(out["pair_logits"], -1),
                "pair_mlm_other_image": jnp.argmax(mismatched, -1)}
    return jax.jit(score)


def _accuracy(predicted: np.ndarray, targets: np.ndarray, weights: np.ndarray) -> tuple[float, float]:
    """(share of the masked targets predicted, share of the most frequent masked target) of predicted and
    targets int [N,L] at weights [N,L] > 0."""
    chosen = np.asarray(weights) > 0
    count = max(int(chosen.sum()), 1)
    mode = int(np.bincount(targets[chosen]).max()) if chosen.any() else 0
    return int(np.sum(predicted[chosen] == targets[chosen])) / count, mode / count


def masked_eval(config, model: nn.Module, params, mesh: Mesh, rules, cache: dict) -> dict[str, float]:
    """Held-out masked accuracy of the three parts: the test images, one caption each (fixed seed), masks from
    key(EVAL_SEED). {'mdm/<part>_acc', 'mdm/<part>_baseline_acc' (the most frequent target's share of those
    masked targets: the best constant predictor)} for parts mim, mlm, pair_mlm, and 'mdm/pair_mlm_other_image_acc':
    the pair part with each caption given another test image (what the image adds is the difference);
    {} for caption corpora."""
    if pipeline.is_captioned(config):
        return {}
    if "mdm_test" not in cache:
        test, caption = pipeline.load_eval_split(config, "test"), pipeline.caption_fn(config)
        rng = np.random.default_rng(EVAL_SEED)
        text = get_tokenizer(config.model.text).encode([caption(int(label), rng) for label in test["label"]])
        batch = {"image": jnp.asarray(test["image"]), "text": jnp.asarray(text)}
        inputs, targets = mask_inputs(config, batch, jax.random.key(EVAL_SEED), ("image", "text", "pair"))
        cache["mdm_test"] = jax.device_get((inputs, targets))
        cache["mdm_test_images"] = (test["image"], test["label"])
    inputs, targets = cache["mdm_test"]
    out = batched_apply(_eval_fn(model), params, inputs, mesh, rules, int(config.eval.batch_size))
    scored = {"mim": (out["codes"], targets["image_mask"]), "mlm": targets["text"], "pair_mlm": targets["pair"],
              "pair_mlm_other_image": targets["pair"]}
    results = {}
    for part, (tgt, weights) in scored.items():
        results[f"mdm/{part}_acc"], baseline = _accuracy(out[part], tgt, weights)
        if part != "pair_mlm_other_image":  # the same targets as pair_mlm
            results[f"mdm/{part}_baseline_acc"] = baseline
    images, labels = cache["mdm_test_images"]
    results.update(digit_word_eval(config, model, params, mesh, rules, images, labels, int(config.eval.batch_size),
                                   cache.setdefault("mdm_digit_word", {})))
    return results


def random_init_params(config, model: nn.Module, mesh: Mesh, rules):
    """The parameters a run of `config` starts from before `init_from` loads anything: `model.init` with
    key(config.seed) on the task's dummy batch, as `mmjax.training.state.StateFactory.init` draws them."""
    shards = int(mesh.shape["data"]) * int(mesh.shape["fsdp"])
    batch = {k: jnp.zeros(v.shape, v.dtype) for k, v in MdmTask().dummy_batch(config, shards).items()}
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return jax.jit(lambda r: nn.unbox(model.init(r, batch)["params"]))(jax.random.key(int(config.seed)))


def random_init_probe(config, model: nn.Module, mesh: Mesh, rules, data: dict, batch_size: int) -> dict[str, float]:
    """The linear probe (`mmjax.eval.linear_probe.linear_probe_eval`, fitted on data['train'], scored on
    data['test'], each {'image' [N, H, W, C], 'label' [N]}) on the image features of the same architecture at
    random init (`random_init_params`): {'linear_probe/random_init/top1', 'linear_probe/random_init/l2'}, what
    pretraining's 'linear_probe/top1' is compared against."""
    encoder = TowerEncoder(model, random_init_params(config, model, mesh, rules), mesh, rules, batch_size)
    probe, info = linear_probe_eval(encoder, data["train"], data["test"])
    return {"linear_probe/random_init/top1": probe["linear_probe/top1"], "linear_probe/random_init/l2": info["l2"]}


def _fullmatches_all(patterns, names) -> bool:
    return all(any(re.fullmatch(p, n) for p in patterns) for n in names)


def tokenizer_size(config) -> int:
    """Side of the images the tokenizer sees: its code grid (image_size / 2^(len(model.vq.widths) - 1)) is then
    the patch grid."""
    return grid_side(config) * 2 ** (len(tuple(config.model.vq.widths)) - 1)


def tokenizer_problems(config) -> list[str]:
    """With an image loss: image_tokenizer.workdir names the tokenizer, init_from loads it from there and
    optim.freeze_rules freeze it (what `prepare_tokenizer` fills in)."""
    if float(config.model.mdm.image_weight) <= 0:
        return []
    problems, workdir = [], config.image_tokenizer.workdir
    if not workdir:  # `mmjax train` trains one first (Task.prepare) and fills in the keys checked below
        return []
    if storage.absolute(config.init_from.path or ".") != storage.absolute(workdir):
        problems.append(f"init_from.path={config.init_from.path!r} must be image_tokenizer.workdir={workdir!r} (the "
                        f"tokenizer's parameters are loaded from it)")
    elif not _fullmatches_all([config.init_from.include], TOKENIZER_PARAMS):
        problems.append(f"init_from.include={config.init_from.include!r} must load the image tokenizer: use "
                        f"{TOKENIZER_REGEX!r}")
    if not _fullmatches_all(tuple(config.optim.freeze_rules), TOKENIZER_PARAMS):
        problems.append(f"optim.freeze_rules must freeze the image tokenizer of task 'mdm': add {TOKENIZER_REGEX!r}")
    return problems


def prepare_tokenizer(config, workdir: str, train_fn: Callable, log: Callable = print):
    """Before training (I/O): the config with the image tokenizer wired in (`vq.use_image_tokenizer`, trained
    first on `tokenizer_size` images when image_tokenizer.workdir is empty; nothing to do without an image loss).
    ConfigError (one line) when the tokenizer was trained on images of another size than `tokenizer_size`."""
    if float(config.model.mdm.image_weight) <= 0:
        return config
    vq_config = tokenizer_config(config)
    vq_config.model.image.image_size = tokenizer_size(config)
    c, source = use_image_tokenizer(config, workdir, train_fn, log, include=TOKENIZER_REGEX, vq_config=vq_config)
    if int(source.model.image.image_size) != tokenizer_size(c):
        raise ConfigError([f"image_tokenizer.workdir={c.image_tokenizer.workdir!r} was trained on "
                           f"{source.model.image.image_size}px images; task 'mdm' feeds it {tokenizer_size(c)}px ones "
                           f"(one code per patch of the {grid_side(c)}x{grid_side(c)} grid)"])
    c.lock()
    return c


def multiway_shape_problems(config) -> list[str]:
    """The multiway stack's shapes (model.mdm) against the image grid: what every model on it needs (task 'mdm',
    and task 'classification' with model.fusion.backbone='multiway')."""
    d, m, problems = config.model.mdm, config.model, []
    for key in ("width", "depth", "num_heads", "mlp_dim"):
        if d[key] < 1:
            problems.append(f"model.mdm.{key} must be positive, got {d[key]}")
    if d.num_heads >= 1 and d.width % d.num_heads:
        problems.append(f"model.mdm.width={d.width} is not divisible by model.mdm.num_heads={d.num_heads}")
    if not 0 <= d.vl_layers <= d.depth:
        problems.append(f"model.mdm.vl_layers must be in [0, model.mdm.depth={d.depth}], got {d.vl_layers}")
    if m.image.image_size % m.image.patch_size:
        problems.append(f"model.image.image_size={m.image.image_size} is not divisible by "
                        f"model.image.patch_size={m.image.patch_size}")
    return problems


def mdm_problems(config) -> list[str]:
    """model.mdm's shapes, ratios and weights against the image grid, the vocabulary and the mesh."""
    d, m, o = config.model.mdm, config.model, config.objectives
    problems = multiway_shape_problems(config)
    if d.min_block_patches < 1:
        problems.append(f"model.mdm.min_block_patches must be positive, got {d.min_block_patches}")
    if not 0.0 < d.image_mask_ratio < 1.0:
        problems.append(f"model.mdm.image_mask_ratio must be in (0, 1), got {d.image_mask_ratio}")
    for key in ("text_mask_ratio", "pair_text_mask_ratio"):
        if not 0.0 < d[key] <= 1.0:
            problems.append(f"model.mdm.{key} must be in (0, 1], got {d[key]}")
    weights = ("image_weight", "text_weight", "pair_weight", "contrastive_weight")
    problems += [f"model.mdm.{k} must be >= 0, got {d[k]}" for k in weights if d[k] < 0]
    if not any(d[k] > 0 for k in weights):
        problems.append(f"model.mdm: every weight ({', '.join(weights)}) is 0; nothing to train")
    if d.contrastive_weight > 0 and config.train.batch_size < 2:
        problems.append("train.batch_size must be >= 2 with model.mdm.contrastive_weight > 0")
    if not 0 <= o.mask_id < m.text.vocab_size or o.mask_id in SPECIAL_TOKEN_IDS or (
            m.text.tokenizer == "bytes" and 3 <= o.mask_id < 259):
        problems.append(f"objectives.mask_id={o.mask_id} must be an id in [0, model.text.vocab_size="
                        f"{m.text.vocab_size}) the tokenizer never emits (bytes: [259, vocab_size))")
    tensor = int(config.mesh.tensor)
    if tensor > 1 and m.vq.codebook_size % tensor:
        problems.append(f"model.vq.codebook_size={m.vq.codebook_size} is not divisible by mesh.tensor={tensor} "
                        f"(the code logits are sharded over tensor)")
    return problems


def fused_forward_flops(config) -> float:
    """FLOPs of the vision-language path's forward on one image-text pair, without heads: the patch embedding and
    the stack on the 1 + N + L sequence (the pair pass here, `MultiwayClassifier` in task 'classification')."""
    d, img, n = config.model.mdm, config.model.image, grid_side(config) ** 2
    patch_embed = 2.0 * n * int(img.patch_size) ** 2 * int(img.channels) * int(d.width)
    return patch_embed + encoder_forward_flops(1 + n + int(config.model.text.max_len), int(d.width), int(d.depth),
                                               int(d.mlp_dim))


def mdm_flops_per_example(config) -> float:
    """Model FLOPs of one training example: 3 x the forward of the active passes (patch embedding, the stack,
    the heads). The frozen tokenizer's forward is not counted."""
    d, img, parts = config.model.mdm, config.model.image, active_parts(config.model.mdm)
    w, depth, mlp, n = int(d.width), int(d.depth), int(d.mlp_dim), grid_side(config) ** 2
    length = int(config.model.text.max_len)
    vocab, codes = int(config.model.text.vocab_size), int(config.model.vq.codebook_size)
    patch_embed = 2.0 * n * int(img.patch_size) ** 2 * int(img.channels) * w
    forward = {"image": patch_embed + encoder_forward_flops(1 + n, w, depth, mlp) + 2.0 * n * w * codes,
               "text": encoder_forward_flops(length, w, depth, mlp) + 2.0 * length * w * vocab,
               "pair": fused_forward_flops(config) + 2.0 * length * w * vocab}
    return 3.0 * sum(forward[p] for p in parts)


class MdmTask(Task):
    name = "mdm"

    def build_model(self, model_config) -> nn.Module:
        return build_multiway_model(model_config)

    def objective(self, config, mesh: Mesh):
        return mdm_objective(config)

    def evaluate(self, config, model, params, mesh, rules, cache):
        results = contrastive_evals(config, model, params, mesh, rules, cache)
        if config.eval.linear_probe and "data" in cache:  # the random-init probe does not change: computed once
            if "random_init_probe" not in cache:
                cache["random_init_probe"] = self.reference_evals(config, model, mesh, rules, cache["data"],
                                                                  int(config.eval.batch_size))
            results.update(cache["random_init_probe"])
        results.update(masked_eval(config, model, params, mesh, rules, cache))
        return results

    def reference_evals(self, config, model, mesh, rules, data, batch_size):
        """The linear probe at random init (`random_init_probe`)."""
        return random_init_probe(config, model, mesh, rules, data, batch_size)

    def prepare(self, config, workdir: str, train_fn: Callable, log: Callable = print):
        return prepare_tokenizer(config, workdir, train_fn, log)

    def config_problems(self, config) -> list[str]:
        return (image_text_only_problems(config, self.name) + mdm_problems(config) + tokenizer_problems(config)
                + validation.evaluator_problems(config))

    def flops_per_example(self, config) -> float:
        return mdm_flops_per_example(config)
