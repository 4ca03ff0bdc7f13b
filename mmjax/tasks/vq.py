"""Task 'vq': an image tokenizer. A convolutional VQ autoencoder (`mmjax.models.vq`) with a cosine codebook,
trained on images alone (batch key 'image'; the captions the loader reads are dropped).

Objective (`mmjax.losses.vq.vq_loss`): reconstruction ('l2' or 'l1', `model.vq.recon_loss`) + the VQ-VAE codebook
and commitment losses + the dead-code restart (codes no latent of the batch chose are pulled onto their nearest
latent). The codebook is a parameter learned by gradient: the train state holds parameters and optimizer state
only, so there is no EMA codebook. Step metrics: 'recon_loss', 'mse', 'baseline_mse', 'usage', 'perplexity',
'dead_codes', the codebook/commitment/dead-code losses.

Evaluation (`vq_eval`, held-out split of the labelled datasets): reconstruction MSE and PSNR in pixel values
[0, 1], against the trivial baseline of predicting every test image by the train split's per-pixel mean, codebook
usage / perplexity over all the test images' codes, and the independent classifier of the generation evaluation
(`real_eval_images`: `mmjax.eval.generation.PixelClassifier` fitted on the real training images) on the test
images and on their reconstructions ('vq/...').

Inference: `VQTokenizer` (`encode_tokens(images) -> codes`, `decode_tokens(codes) -> images`), which
`VQTask.inference_methods` hands to `mmjax.load`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mmjax import config as config_lib
from mmjax import storage
from mmjax.data import pipeline
from mmjax.data.image import preprocess_images
from mmjax.errors import ConfigError
from mmjax.eval import generation as gen_metrics
from mmjax.eval.encoder import batched_apply, round_batch
from mmjax.losses import vq as vq_losses
from mmjax.models.vq import build_vq_model, code_grid, vq_flops_per_example
from mmjax.tasks.base import Task


def pixel_bounds(config) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(low, high), each one value per channel: the normalised values of pixel values 0 and 1 (data.image_mean,
    data.image_std)."""
    mean, std = config.data.image_mean, config.data.image_std
    return tuple(-m / s for m, s in zip(mean, std)), tuple((1.0 - m) / s for m, s in zip(mean, std))


def vq_objective(config):
    """objective(model, params, batch, step) -> (loss, metrics) of `config.model.vq` on batch['image'], the
    reconstruction clipped to `pixel_bounds` when model.vq.clip_loss is set."""
    vq_config = config.model.vq
    bounds = pixel_bounds(config) if bool(vq_config.clip_loss) else None
    weights = {"codebook": float(vq_config.codebook_weight), "commitment": float(vq_config.commitment_weight),
               "restart": float(vq_config.restart_weight)}
    recon = str(vq_config.recon_loss)

    def objective(model, params, batch, step):
        del step
        outputs = model.apply({"params": params}, {"image": batch["image"]}, train=True)
        return vq_losses.vq_loss(outputs, batch["image"], weights, recon, bounds)

    return objective


def to_pixels(images: np.ndarray, config) -> np.ndarray:
    """Normalised images [N, H, W, C] (as the model sees them) -> pixel values in [0, 1], float32, clipped."""
    mean = np.asarray(config.data.image_mean, np.float32)
    std = np.asarray(config.data.image_std, np.float32)
    return np.clip(np.asarray(images, np.float32) * std + mean, 0.0, 1.0)


def psnr(mse: float) -> float:
    """Peak signal-to-noise ratio in dB of a mean squared error of [0, 1] pixel values."""
    return float(10.0 * math.log10(1.0 / max(mse, 1e-12)))


def _reconstruct_fn(model: nn.Module) -> Callable:
    return jax.jit(lambda p, b: model.apply({"params": p}, b["image"], method="reconstruct"))


def real_eval_images(config, cache: dict) -> dict:
    """The labelled dataset's real images as the image evaluators see them, and the independent classifier,
    computed once per `cache` (shared by task 'vq' and task 'text_to_image'): {'train' | 'test': {'image':
    normalised float32 [N, H, W, C] (as the model sees them), 'pixels': pixel values [N, H, W, C] in [0, 1],
    uint8-rounded, 'label': int [N]}, 'classifier': `mmjax.eval.generation.PixelClassifier` fitted on the train
    split's pixels}."""
    if "real_images" not in cache:
        data = {}
        for split in ("train", "test"):
            raw = pipeline.load_eval_split(config, split)
            data[split] = {"pixels": gen_metrics.to_uint8(to_pixels(raw["image"], config)) / 255.0,
                           "image": raw["image"], "label": raw["label"]}
        data["classifier"] = gen_metrics.PixelClassifier(data["train"]["pixels"], data["train"]["label"])
        cache["real_images"] = data
    return cache["real_images"]


def reconstruction_realism(data: dict, reconstruct: Callable[[np.ndarray], np.ndarray], seed: int = 0) -> float:
    """The real-vs-generated discriminator (`mmjax.eval.generation.discriminator_accuracy`) of the held-out real
    images (`real_eval_images`) against the reconstructions of as many training images drawn at random (`seed`):
    what a sampler of exactly the training distribution scores through this tokenizer, the floor of any generator
    on it. reconstruct(indices into the train split) -> pixel values [n, H, W, C] in [0, 1], uint8-rounded.
    Training images, not the held-out ones: a reconstruction paired with its own original lands in the other
    cross-validation fold, and the discriminator learns the pairs backwards (0.38 on the digits)."""
    drawn = np.random.default_rng(seed).permutation(len(data["train"]["label"]))[:len(data["test"]["label"])]
    return gen_metrics.discriminator_accuracy(data["test"]["pixels"], reconstruct(drawn), seed=seed)


def vq_eval(config, model: nn.Module, params, mesh: Mesh, rules, cache: dict) -> dict[str, float]:
    """Held-out reconstruction of the test split: 'vq/mse' and 'vq/psnr' (pixel values in [0, 1]),
    'vq/baseline_mse' and 'vq/baseline_psnr' (every image predicted by the train split's per-pixel mean),
    'vq/mse_vs_baseline' (their ratio: < 1 beats the baseline), 'vq/usage' (fraction of the codebook used by
    the test images' codes), 'vq/perplexity', 'vq/num_images'; the independent classifier (`real_eval_images`)
    on the test images, 'vq/classifier_accuracy_original', and on their reconstructions (uint8-rounded, as
    generated images are judged), 'vq/classifier_accuracy_reconstructed', and 'vq/classifier_accuracy_gap'
    (original - reconstructed); 'vq/discriminator_accuracy' (`reconstruction_realism`: real held-out images
    against reconstructed training images; 0.5 is indistinguishable). {} for caption corpora (no held-out
    split)."""
    if pipeline.is_captioned(config):
        return {}
    data = real_eval_images(config, cache)
    batch = round_batch(int(config.eval.batch_size), mesh)

    def reconstruct(images):  # normalised [N, H, W, C] -> the model's output: reconstruction, codes
        return batched_apply(_reconstruct_fn(model), params, {"image": images}, mesh, rules, batch)

    if "vq_mean" not in cache:
        cache["vq_mean"] = to_pixels(data["train"]["image"], config).mean(axis=0)
    test, labels = data["test"]["image"], data["test"]["label"]
    out = reconstruct(test)
    truth, recon = to_pixels(test, config), to_pixels(out["reconstruction"], config)
    mse = float(np.mean(np.square(recon - truth)))
    baseline = float(np.mean(np.square(cache["vq_mean"][None] - truth)))
    counts = vq_losses.code_counts(jnp.asarray(out["codes"]), int(config.model.vq.codebook_size))
    usage, perplexity = jax.device_get(vq_losses.usage_and_perplexity(counts))
    original = data["classifier"].accuracy(data["test"]["pixels"], labels)
    reconstructed = data["classifier"].accuracy(gen_metrics.to_uint8(recon) / 255.0, labels)
    return {"vq/mse": mse, "vq/psnr": psnr(mse), "vq/baseline_mse": baseline, "vq/baseline_psnr": psnr(baseline),
            "vq/mse_vs_baseline": mse / max(baseline, 1e-12), "vq/usage": float(usage),
            "vq/perplexity": float(perplexity), "vq/num_images": float(len(test)),
            "vq/classifier_accuracy_original": original, "vq/classifier_accuracy_reconstructed": reconstructed,
            "vq/classifier_accuracy_gap": original - reconstructed,
            "vq/discriminator_accuracy": reconstruction_realism(data, lambda drawn: gen_metrics.to_uint8(to_pixels(
                reconstruct(data["train"]["image"][drawn])["reconstruction"], config)) / 255.0)}


def tokenizer_config(config):
    """The task 'vq' config that trains the image tokenizer of `config` (a task reading image codes, its
    image_tokenizer section): its model.image / model.vq / data / mesh, image_tokenizer's steps, batch and lr."""
    c, t = config_lib.base_config(), config.image_tokenizer
    c.seed, c.task = int(config.seed), "vq"
    c.data.update(config.data.to_dict())
    c.data.augment = False
    c.model.image.update(config.model.image.to_dict())
    c.model.vq.update(config.model.vq.to_dict())
    c.mesh.update(config.mesh.to_dict())
    c.optim.update(lr=float(t.lr), warmup_steps=min(50, int(t.steps) // 4), decay="cosine", weight_decay=0.0)
    c.train.update(steps=int(t.steps), batch_size=int(t.batch_size), log_every=50)
    c.checkpoint.every_steps = int(t.steps)
    c.eval.zeroshot = False
    return c


def use_image_tokenizer(config, workdir: str, train_fn: Callable, log: Callable, *, include: str,
                        vq_config=None):
    """The one wiring of an image tokenizer into a task that reads image codes ('text_to_image', 'mdm'), before
    training (I/O). With image_tokenizer.workdir empty, `train_fn(vq_config or tokenizer_config(config),
    <workdir>/tokenizer)` trains one first (skipped once its last checkpoint exists). Returns (the config,
    unlocked, with image_tokenizer.workdir set, init_from loading `include` from it, optim.freeze_rules freezing
    `include`, and the tokenizer's model.vq, model.image.channels and data.image_mean / image_std; the tokenizer
    run's own config). ConfigError (one line) when the workdir is not a task 'vq' run."""
    tokenizer = config.image_tokenizer.workdir
    if not tokenizer:
        tokenizer = storage.join(workdir, "tokenizer")
        vq_config = tokenizer_config(config) if vq_config is None else vq_config
        if not storage.isdir(storage.join(tokenizer, "checkpoints", str(vq_config.train.steps))):
            log(f"mmjax: image_tokenizer.workdir is empty: training an image tokenizer first in {tokenizer}")
            train_fn(vq_config, tokenizer)
    source = config_lib.load_workdir_config(tokenizer)
    if source.task != "vq":
        raise ConfigError([f"image_tokenizer.workdir={tokenizer!r} is a task {source.task!r} workdir, not an image "
                           f"tokenizer (task 'vq')"])
    c = config.copy_and_resolve_references()
    c.unlock()
    c.image_tokenizer.workdir = tokenizer
    c.init_from.update(path=tokenizer, include=include)
    if include not in tuple(c.optim.freeze_rules):
        c.optim.freeze_rules = tuple(c.optim.freeze_rules) + (include,)
    c.model.vq.update(source.model.vq.to_dict())
    c.model.image.channels = int(source.model.image.channels)
    c.data.update(image_mean=tuple(source.data.image_mean), image_std=tuple(source.data.image_std))
    return c, source


class VQTokenizer:
    """A trained tokenizer's two functions, on numpy in and out (batched and sharded over `mesh`).

        codes = tok.encode_tokens(uint8_images)   # [N, H, W(, C)] any size -> int32 [N, h, w]
        images = tok.decode_tokens(codes)          # int [N, h, w] -> float32 [N, S, S, C] in [0, 1]
    """

    def __init__(self, config, model: nn.Module, params, mesh: Mesh, rules, batch_size: int = 256):
        self.config, self.model, self.params, self.mesh, self.rules = config, model, params, mesh, rules
        self.batch_size = round_batch(batch_size, mesh)
        self.grid = code_grid(config.model)  # codes per side
        self.codebook_size = int(config.model.vq.codebook_size)
        self._encode = jax.jit(lambda p, b: {"codes": model.apply({"params": p}, b["image"], method="encode")})
        self._decode = jax.jit(lambda p, b: {"image": model.apply({"params": p}, b["codes"], method="decode")})

    def preprocess(self, images) -> np.ndarray:
        """uint8 [N, H, W(, C)] (or float in [0, 1]), any size -> normalised float32 [N, S, S, C] (the model's)."""
        img = self.config.model.image
        return preprocess_images(images, int(img.image_size), int(img.channels), self.config.data.image_mean,
                                 self.config.data.image_std)

    def encode_tokens(self, images) -> np.ndarray:
        """images uint8 [N, H, W] or [N, H, W, C] (or float in [0, 1]), any H, W -> codes int32 [N, h, w]."""
        images = np.asarray(images)
        if images.ndim not in (3, 4):
            raise ValueError(f"encode_tokens expects [N,H,W] or [N,H,W,C] images, got shape {images.shape}")
        x = self.preprocess(images)
        return batched_apply(self._encode, self.params, {"image": x}, self.mesh, self.rules,
                             self.batch_size)["codes"].astype(np.int32)

    def decode_tokens(self, codes) -> np.ndarray:
        """codes int [N, h, w] in [0, codebook_size) -> images float32 [N, S, S, C], pixel values in [0, 1]."""
        codes = np.asarray(codes)
        if codes.ndim != 3 or codes.shape[1:] != (self.grid, self.grid) or not np.issubdtype(codes.dtype,
                                                                                            np.integer):
            raise ValueError(f"decode_tokens expects integer codes [N, {self.grid}, {self.grid}], got "
                             f"{codes.dtype} {codes.shape}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"decode_tokens: codes must lie in [0, {self.codebook_size}), got "
                             f"[{codes.min()}, {codes.max()}]")
        out = batched_apply(self._decode, self.params, {"codes": codes.astype(np.int32)}, self.mesh, self.rules,
                            self.batch_size)
        return to_pixels(out["image"], self.config)


def vq_problems(config) -> list[str]:
    """The 'vq' task's config checks: model.vq's shapes and weights against the image size and the mesh, and the
    step features it does not implement."""
    v, img, problems = config.model.vq, config.model.image, []
    widths = tuple(v.widths)
    if not widths or any(int(w) <= 0 for w in widths):
        problems.append(f"model.vq.widths must be a non-empty tuple of positive ints, got {widths}")
    elif img.image_size % 2 ** (len(widths) - 1):
        problems.append(f"model.image.image_size={img.image_size} is not divisible by 2^(len(model.vq.widths)-1)="
                        f"{2 ** (len(widths) - 1)} (one stride-2 level per width after the first)")
    for key, low in (("res_blocks", 0), ("code_dim", 1), ("codebook_size", 2)):
        if v[key] < low:
            problems.append(f"model.vq.{key} must be >= {low}, got {v[key]}")
    if v.recon_loss not in vq_losses.RECON_LOSSES:
        problems.append(f"model.vq.recon_loss: {v.recon_loss!r}; choose one of {vq_losses.RECON_LOSSES}")
    for key in ("codebook_weight", "commitment_weight", "restart_weight"):
        if v[key] < 0:
            problems.append(f"model.vq.{key} must be >= 0, got {v[key]}")
    fsdp, tensor = int(config.mesh.fsdp), int(config.mesh.tensor)
    if fsdp > 1 and any(int(w) % fsdp for w in widths):
        problems.append(f"model.vq.widths={widths}: every width must be divisible by mesh.fsdp={fsdp} (the conv "
                        f"channels are sharded over fsdp)")
    if tensor > 1 and v.codebook_size % tensor:
        problems.append(f"model.vq.codebook_size={v.codebook_size} is not divisible by mesh.tensor={tensor} (the "
                        f"codebook rows are sharded over tensor)")
    if config.train.micro_batches > 1:
        problems.append(f"train.micro_batches={config.train.micro_batches}: gradient accumulation is implemented "
                        f"for task 'contrastive' only; set it to 1 for task 'vq'")
    if config.finetune.mode != "none":
        problems.append(f"finetune.mode={config.finetune.mode!r} is only supported with task 'contrastive'; use "
                        f"finetune.mode='none' for task 'vq'")
    return problems


class VQTask(Task):
    name = "vq"

    def inputs(self, config) -> tuple[str, ...]:
        return ("image",)

    def build_model(self, model_config) -> nn.Module:
        return build_vq_model(model_config)

    def dummy_batch(self, config, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        return {"image": super().dummy_batch(config, batch_size)["image"]}

    def objective(self, config, mesh: Mesh):
        return vq_objective(config)

    def evaluate(self, config, model, params, mesh, rules, cache):
        return vq_eval(config, model, params, mesh, rules, cache)

    def config_problems(self, config) -> list[str]:
        return vq_problems(config)

    def flops_per_example(self, config) -> float:
        return vq_flops_per_example(config.model)

    def inference_methods(self, config, model, params, mesh, rules, batch_size: int = 256) -> dict[str, Callable]:
        """What `mmjax.load` adds to a loaded VQ model: {'encode_tokens', 'decode_tokens'} (`VQTokenizer`)."""
        tokenizer = VQTokenizer(config, model, params, mesh, rules, batch_size)
        return {"encode_tokens": tokenizer.encode_tokens, "decode_tokens": tokenizer.decode_tokens}
