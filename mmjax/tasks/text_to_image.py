"""Task 'text_to_image': DALL·E-style generation of VQ image codes from a caption (`mmjax.models.text_to_image`).

Objective: cross-entropy of the N image codes only (the caption is the prefix, never a target), each caption
blanked (all PAD) with probability `model.text_to_image.caption_dropout` so that classifier-free guidance works
at sampling time. The codes come from the frozen image tokenizer inside the model ('encoder', 'quantizer',
'decoder' of a task 'vq' workdir: `init_from.path` = `image_tokenizer.workdir`, `init_from.include` and
`optim.freeze_rules` = `TOKENIZER_REGEX`; `prepare` fills these in, training a tokenizer first in
<workdir>/tokenizer when `image_tokenizer.workdir` is empty). Step metrics: 'loss', 'image_token_accuracy',
'bits_per_token'.

Evaluation (`generation_eval`, labelled datasets): the honest measurements of `mmjax.eval.generation` under
'gen/...' (see docs/generative.md). Inference: `ImageGenerator.generate_images(prompts, num, guidance, seed,
rerank_with)` (what `mmjax.load(W)` adds) and `generate_to_folder` (the `mmjax generate` command's writer).
"""

from __future__ import annotations

import io
import math
import re
import warnings
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from PIL import Image

from mmjax import storage
from mmjax.config import PAD_ID
from mmjax.data import image_codes, pipeline
from mmjax.data.tokenizers import get_tokenizer
from mmjax.errors import ConfigError
from mmjax.eval import generation as gen_metrics
from mmjax.eval.encoder import batched_apply, round_batch
from mmjax.models.text_to_image import build_text_to_image_model, sample_codes
from mmjax.models.vq import code_grid, vq_flops_per_example
from mmjax.runtime.flops import train_flops_per_example
from mmjax.tasks.base import Sampler, Task
from mmjax.tasks.vq import real_eval_images, reconstruction_realism, to_pixels, use_image_tokenizer, vq_problems

# The tokenizer's parameters in the model: init_from loads them from the tokenizer's workdir, freeze_rules freeze them.
TOKENIZER_REGEX = r"(encoder|quantizer|decoder)/.*"
TOKENIZER_PARAMS = ("encoder/conv_in/kernel", "quantizer/embedding", "decoder/conv_out/kernel")
CAPTION_SEED = 0  # the held-out captions of the NLL measurement


def image_token_loss(logits: jax.Array, codes: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """logits float [B,N,K] of the image codes, codes int [B,N] -> (mean cross-entropy over the B*N image
    tokens, {'image_token_accuracy', 'bits_per_token'})."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), codes)
    loss = jnp.mean(ce)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == codes)
    return loss, {"image_token_accuracy": accuracy, "bits_per_token": loss / math.log(2.0)}


def blank_captions(text: jax.Array, key: jax.Array, probability: float) -> jax.Array:
    """text int [B,T] -> the same with each row replaced by all PAD_ID with `probability` (drawn with `key`)."""
    drop = jax.random.bernoulli(key, probability, (text.shape[0],))
    return jnp.where(drop[:, None], PAD_ID, text)


def noisy_codes(codes: jax.Array, key: jax.Array, probability: float, vocab: int) -> jax.Array:
    """codes int [B,N] -> the same with each code replaced by a uniformly drawn one with `probability`."""
    replace = jax.random.bernoulli(key, probability, codes.shape)
    return jnp.where(replace, jax.random.randint(jax.random.fold_in(key, 1), codes.shape, 0, vocab), codes)


def text_to_image_objective(config):
    """objective(model, params, batch, step) -> (image-token CE, metrics): captions dropped per step, and with
    model.text_to_image.input_noise > 0 the codes the generator reads (teacher forcing) replaced at random while
    the targets stay the true codes (a regulariser against memorising the few training images). The codes are
    batch['codes'] int [B, h*w] when the data is pre-tokenised (data.codes_dir), else the frozen tokenizer's
    codes of batch['image']."""
    o, seed = config.model.text_to_image, int(config.seed)
    probability, noise, vocab = float(o.caption_dropout), float(o.input_noise), int(o.image_vocab)

    def objective(model, params, batch, step):
        key = jax.random.fold_in(jax.random.key(seed), step)
        text = blank_captions(batch["text"], key, probability) if probability > 0 else batch["text"]
        if "codes" in batch:
            codes = batch["codes"].astype(jnp.int32)
        else:
            codes = jax.lax.stop_gradient(model.apply({"params": params}, batch["image"], method="encode"))
        codes = codes.reshape(codes.shape[0], -1)
        inputs = noisy_codes(codes, jax.random.fold_in(key, 2), noise, vocab) if noise > 0 else codes
        return image_token_loss(model.apply({"params": params}, text, inputs, method="image_logits"), codes)

    return objective


class ImageGenerator:
    """Sampling, decoding and re-ranking of a trained text-to-image model, numpy in and out.

        images = gen.generate_images(["a photo of the number seven."], num=16)  # uint8 [1, 16, H, W, C]
    """

    def __init__(self, config, model: nn.Module, params, mesh: Mesh, rules, batch_size: int = 256):
        self.config, self.model, self.params, self.mesh, self.rules = config, model, params, mesh, rules
        self.batch_size = round_batch(batch_size, mesh)
        self.tokenizer = get_tokenizer(config.model.text)
        self.options = config.model.text_to_image
        self.grid = int(math.isqrt(model.image_tokens))
        self._samplers: dict[float, Callable] = {}
        self._decode = jax.jit(lambda p, b: {"image": model.apply({"params": p}, b["codes"], method="decode")})

    def encode_prompts(self, prompts: Sequence[str]) -> np.ndarray:
        """prompts -> int32 [P,T]; ValueError (one line) for a prompt longer than the text context."""
        if isinstance(prompts, str):
            raise TypeError("prompts: expected a list of strings, got a single string; wrap it in [ ]")
        limit = int(self.config.model.text.max_len) - 2
        for i, prompt in enumerate(prompts):
            if len(self.tokenizer.text_to_ids(prompt)) > limit:
                raise ValueError(f"prompt {i} is {len(self.tokenizer.text_to_ids(prompt))} tokens, longer than the "
                                 f"text context of {limit} (model.text.max_len={self.config.model.text.max_len} "
                                 f"minus BOS and EOT)")
        return self.tokenizer.encode(list(prompts))

    def _sampler(self, guidance: float) -> Callable:
        if guidance not in self._samplers:
            o, model = self.options, self.model

            def fn(params, batch):
                key = jax.random.fold_in(jax.random.key(batch["seed"][0]), batch["row"][0])
                codes = sample_codes(model, params, batch["text"], key, guidance=guidance,
                                     temperature=float(o.temperature), top_k=int(o.top_k), top_p=float(o.top_p))
                return {"codes": codes}
            self._samplers[guidance] = jax.jit(fn)
        return self._samplers[guidance]

    def sample_codes(self, text: np.ndarray, guidance: float, seed: int = 0) -> np.ndarray:
        """Captions int32 [R,T] -> codes int32 [R,h,w]; the same seed gives the same codes."""
        rows = len(text)
        inputs = {"text": np.asarray(text, np.int32), "row": np.arange(rows, dtype=np.int32),
                  "seed": np.full((rows,), seed, np.int32)}
        codes = batched_apply(self._sampler(float(guidance)), self.params, inputs, self.mesh, self.rules,
                              self.batch_size)["codes"]
        return codes.reshape(rows, self.grid, self.grid).astype(np.int32)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """codes int [R,h,w] -> pixel values float32 [R,H,W,C] in [0, 1]."""
        out = batched_apply(self._decode, self.params, {"codes": np.asarray(codes, np.int32)}, self.mesh,
                            self.rules, self.batch_size)["image"]
        return to_pixels(out, self.config)

    def generate_codes(self, prompts: Sequence[str], num: int, guidance: float, seed: int = 0) -> np.ndarray:
        """prompts -> codes int32 [P,num,h,w] (`num` samples of each prompt)."""
        if int(num) < 1:
            raise ValueError(f"num must be >= 1 (samples per prompt), got {num}")
        check_guidance(self.config, guidance)
        text = np.repeat(self.encode_prompts(prompts), int(num), axis=0)
        return self.sample_codes(text, guidance, seed).reshape(len(prompts), int(num), self.grid, self.grid)

    def generate_images(self, prompts: Sequence[str], num: int = 16, guidance: float | None = None, seed: int = 0,
                        rerank_with=None) -> np.ndarray:
        """prompts (list of P strings) -> uint8 [P,num,H,W,C]. guidance: the classifier-free guidance scale (None:
        model.text_to_image.guidance; 1 = conditional only, 0 = unconditional). rerank_with: a loaded contrastive
        model (`mmjax.load(W_clip)`, anything with encode_image / encode_text): rerank_factor * num candidates are
        drawn and the num most similar to their prompt kept, best first. The same seed gives the same images."""
        guidance = float(self.options.guidance if guidance is None else guidance)
        factor = int(self.options.rerank_factor) if rerank_with is not None else 1
        codes = self.generate_codes(prompts, int(num) * factor, guidance, seed)
        shape = codes.shape
        images = gen_metrics.to_uint8(self.decode(codes.reshape((-1,) + shape[2:])))
        images = images.reshape(shape[:2] + images.shape[1:])
        if rerank_with is not None:
            images = rerank(images, prompts, rerank_with, int(num))
        return images


def rerank(images: np.ndarray, prompts: Sequence[str], clip, keep: int) -> np.ndarray:
    """images uint8 [P,M,H,W,C], a contrastive model with encode_image / encode_text -> the `keep` images of
    each prompt most similar to it (cosine of the embeddings), best first: uint8 [P,keep,H,W,C]."""
    text = np.asarray(clip.encode_text(list(prompts)))
    out = []
    for p in range(len(prompts)):
        scores = np.asarray(clip.encode_image(images[p])) @ text[p]
        out.append(images[p][np.argsort(-scores, kind="stable")[:keep]])
    return np.stack(out)


def check_guidance(config, guidance: float) -> None:
    """A warning when guidance != 1 on a model trained without caption dropout (it never saw a blank caption,
    so its 'unconditional' logits are meaningless and guidance amplifies noise)."""
    if float(guidance) != 1.0 and float(config.model.text_to_image.caption_dropout) <= 0:
        warnings.warn(f"guidance={guidance}: this model was trained with model.text_to_image.caption_dropout=0, so "
                      f"it never saw a blank caption and has no unconditional model to guide against; use "
                      f"guidance=1", stacklevel=3)


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
    return buffer.getvalue()


def generate_to_folder(loaded_model, prompts: Sequence[str], num: int, guidance: float | None, rerank_with,
                       out_dir: str, seed: int = 0) -> list[str]:
    """`mmjax generate`: `loaded_model.generate_images(...)` written (through mmjax.storage, out_dir may be a URL)
    as out_dir/<prompt index>_<sample index>.png and out_dir/grid.png (one row per prompt). Returns the paths."""
    images = loaded_model.generate_images(list(prompts), num=num, guidance=guidance, seed=seed,
                                          rerank_with=rerank_with)
    storage.makedirs(out_dir)
    paths = []
    for p in range(images.shape[0]):
        for s in range(images.shape[1]):
            paths.append(storage.join(out_dir, f"{p}_{s}.png"))
            storage.write_bytes_atomic(paths[-1], _png(images[p, s]))
    paths.append(storage.join(out_dir, "grid.png"))
    storage.write_bytes_atomic(paths[-1], _png(gen_metrics.image_grid(images)))
    return paths


def _eval_data(config, model, params, mesh, rules, cache: dict) -> dict:
    """The real images (`mmjax.tasks.vq.real_eval_images`: pixels, labels and the independent classifier, computed
    once) with their codes under the current params: data[split]['codes'] int [N, h * w]."""
    data = real_eval_images(config, cache)
    encode = jax.jit(lambda p, b: {"codes": model.apply({"params": p}, b["image"], method="encode")})
    for split in ("train", "test"):  # the tokenizer is frozen, but evaluate may see other params
        data[split]["codes"] = batched_apply(encode, params, {"image": data[split]["image"]}, mesh, rules,
                                             int(config.eval.batch_size))["codes"].reshape(
                                                 len(data[split]["label"]), -1)
    return data


def heldout_bits(config, model, params, mesh, rules, data: dict) -> float:
    """Bits per image token of the test images' codes given one caption each (drawn with CAPTION_SEED)."""
    rng, caption = np.random.default_rng(CAPTION_SEED), pipeline.caption_fn(config)
    text = get_tokenizer(config.model.text).encode([caption(int(y), rng) for y in data["test"]["label"]])

    def nll(p, b):
        logits = model.apply({"params": p}, b["text"], b["codes"], method="image_logits")
        return {"ce": optax.softmax_cross_entropy_with_integer_labels(logits, b["codes"]).sum(-1)}
    ce = batched_apply(jax.jit(nll), params, {"text": text, "codes": data["test"]["codes"].astype(np.int32)},
                       mesh, rules, int(config.eval.batch_size))["ce"]
    return float(np.sum(ce) / data["test"]["codes"].size / math.log(2.0))


def generation_eval(config, model, params, mesh, rules, cache: dict, rerank_with=None) -> dict[str, float]:
    """'gen/...' on the labelled dataset: classifier_accuracy_real (the independent classifier on real held-out
    images), prompt_accuracy (at model.text_to_image.guidance) and prompt_accuracy_guidance_<s> for each of
    eval_guidance, discriminator_accuracy (real held-out vs generated; and discriminator_accuracy_reconstructed,
    `mmjax.tasks.vq.reconstruction_realism`: real held-out vs reconstructed training images, what a sampler of
    exactly the training distribution scores through this tokenizer), nll_bits_per_token and
    nll_baseline_bits_per_token, distinct_fraction / training_copies / unique_fraction of eval_samples per
    prompt; with `rerank_with` (a loaded contrastive model) also prompt_accuracy_reranked,
    discriminator_accuracy_reranked and distinct_fraction_reranked of the kept samples. {} for caption corpora."""
    if pipeline.is_captioned(config):
        return {}
    o, data = config.model.text_to_image, _eval_data(config, model, params, mesh, rules, cache)
    gen = ImageGenerator(config, model, params, mesh, rules, int(config.eval.batch_size))
    names, templates = pipeline.zeroshot_prompts(config)
    prompts, labels = [templates[0].format(n) for n in names], np.arange(len(names))
    n, clf, vocab = int(o.eval_samples), data["classifier"], int(o.image_vocab)
    out = {"gen/classifier_accuracy_real": clf.accuracy(data["test"]["pixels"], data["test"]["label"]),
           "gen/nll_bits_per_token": heldout_bits(config, model, params, mesh, rules, data),
           "gen/nll_baseline_bits_per_token": gen_metrics.baseline_bits_per_token(
               data["train"]["codes"], data["train"]["label"], data["test"]["codes"], data["test"]["label"], vocab,
               len(names))}

    def accuracy(pixels):  # [P, m, H, W, C] in [0, 1]
        return clf.accuracy(pixels.reshape((-1,) + pixels.shape[2:]), np.repeat(labels, pixels.shape[1]))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # guidance on a model without caption dropout: measured anyway
        for scale in sorted(set(float(s) for s in o.eval_guidance) | {float(o.guidance)}):
            images = gen.generate_images(prompts, n, scale, seed=0) / 255.0
            out[f"gen/prompt_accuracy_guidance_{scale:g}"] = accuracy(images)
        per_prompt = -(-len(data["test"]["label"]) // len(prompts))  # as many generated as real test images
        codes = gen.generate_codes(prompts, per_prompt, float(o.guidance), seed=1)
    pixels = gen_metrics.to_uint8(gen.decode(codes.reshape((-1,) + codes.shape[2:]))) / 255.0
    out["gen/prompt_accuracy"] = out[f"gen/prompt_accuracy_guidance_{float(o.guidance):g}"]
    out["gen/discriminator_accuracy"] = gen_metrics.discriminator_accuracy(data["test"]["pixels"], pixels)
    out["gen/discriminator_accuracy_reconstructed"] = reconstruction_realism(data, lambda drawn: gen_metrics.to_uint8(
        gen.decode(data["train"]["codes"][drawn].reshape((-1, gen.grid, gen.grid)))) / 255.0)
    unique = gen_metrics.uniqueness(codes[:, :n].reshape(len(prompts), n, -1), data["train"]["codes"])
    out.update({f"gen/{k}": v for k, v in unique.items()})
    if rerank_with is not None:  # judged as the others: accuracy, realism and diversity of the kept samples
        kept = gen.generate_images(prompts, n, float(o.guidance), seed=0, rerank_with=rerank_with)  # uint8
        out["gen/prompt_accuracy_reranked"] = accuracy(kept / 255.0)
        out["gen/discriminator_accuracy_reranked"] = gen_metrics.discriminator_accuracy(
            data["test"]["pixels"], kept.reshape((-1,) + kept.shape[2:]) / 255.0)
        out["gen/distinct_fraction_reranked"] = float(np.mean(
            [len({row.tobytes() for row in prompt}) / len(prompt) for prompt in kept]))
    return out


def text_to_image_problems(config) -> list[str]:
    """Pure checks: the tokenizer's shapes (`vq_problems`), its codebook = the image vocabulary, and the tokenizer
    named, loaded (init_from) and frozen (freeze_rules)."""
    o, problems = config.model.text_to_image, [p.replace("task 'vq'", "task 'text_to_image'")
                                              for p in vq_problems(config)]
    if int(config.model.vq.codebook_size) != int(o.image_vocab):
        problems.append(f"model.text_to_image.image_vocab={o.image_vocab} differs from the tokenizer's codebook "
                        f"size model.vq.codebook_size={config.model.vq.codebook_size}")
    for key in ("caption_dropout", "input_noise"):
        if not 0.0 <= float(o[key]) < 1.0:
            problems.append(f"model.text_to_image.{key} must be in [0, 1), got {o[key]}")
    for key in ("width", "depth", "num_heads", "mlp_dim", "eval_samples", "rerank_factor"):
        if int(o[key]) < 1:
            problems.append(f"model.text_to_image.{key} must be >= 1, got {o[key]}")
    if int(o.width) % max(int(o.num_heads), 1):
        problems.append(f"model.text_to_image.width={o.width} is not divisible by num_heads={o.num_heads}")
    workdir = config.image_tokenizer.workdir
    if not workdir:  # `mmjax train` trains one first (Task.prepare) and fills in the keys checked below
        return problems
    if storage.absolute(config.init_from.path or ".") != storage.absolute(workdir):
        problems.append(f"init_from.path={config.init_from.path!r} must be image_tokenizer.workdir={workdir!r} (the "
                        f"tokenizer's parameters are loaded from it)")
    elif not all(re.fullmatch(config.init_from.include, p) for p in TOKENIZER_PARAMS):
        problems.append(f"init_from.include={config.init_from.include!r} must load the tokenizer: use "
                        f"{TOKENIZER_REGEX!r}")
    if not all(any(re.fullmatch(r, p) for r in config.optim.freeze_rules) for p in TOKENIZER_PARAMS):
        problems.append(f"optim.freeze_rules must freeze the image tokenizer: add {TOKENIZER_REGEX!r}")
    return problems


def prepare(config, workdir: str, train_fn: Callable, log: Callable = print):
    """Before training (I/O): the config with the tokenizer wired in (`vq.use_image_tokenizer`: trained first when
    image_tokenizer.workdir is empty), its model.image.image_size too. ConfigError (one line) when its codebook
    differs from model.text_to_image.image_vocab."""
    c, source = use_image_tokenizer(config, workdir, train_fn, log, include=TOKENIZER_REGEX)
    if int(source.model.vq.codebook_size) != int(config.model.text_to_image.image_vocab):
        raise ConfigError([f"image_tokenizer.workdir={c.image_tokenizer.workdir!r} has a codebook of "
                           f"{source.model.vq.codebook_size} codes but model.text_to_image.image_vocab="
                           f"{config.model.text_to_image.image_vocab}"])
    c.model.image.image_size = int(source.model.image.image_size)
    if c.data.codes_dir:
        check_codes(c, source)
    c.lock()
    return c


def check_codes(config, tokenizer_config) -> None:
    """ConfigError (one line) unless data.codes_dir holds codes of config.data's dataset written by exactly the
    checkpoint of image_tokenizer.workdir the generator loads (I/O: reads codes.json and the checkpoint list)."""
    where = f"data.codes_dir={config.data.codes_dir!r}"
    try:
        info = image_codes.read_info(config.data.codes_dir)
    except image_codes.CodesError as error:
        raise ConfigError([str(error)]) from None
    tokenizer, dataset = config.image_tokenizer.workdir, image_codes.dataset_name(config)
    step = storage.newest_numbered(storage.join(tokenizer, "checkpoints"))
    problems = []
    if storage.absolute(info["tokenizer"]) != storage.absolute(tokenizer) or info["step"] != step:
        problems.append(f"{where} holds the codes of tokenizer {info['tokenizer']!r} at step {info['step']}, but "
                        f"the generator loads image_tokenizer.workdir={tokenizer!r} at step {step}"
                        f"; write codes with this tokenizer (mmjax tokenize)")
    elif info["dataset"] != dataset:
        problems.append(f"{where} holds codes of {info['dataset']!r}, not of this config's data {dataset!r}")
    elif (int(info["codebook_size"]), int(info["grid"])) != (int(tokenizer_config.model.vq.codebook_size),
                                                           code_grid(config.model)):
        problems.append(f"{where}: codes of a {info['grid']}x{info['grid']} grid of {info['codebook_size']} codes "
                        f"do not fit this generator")
    if problems:
        raise ConfigError(problems)


class TextToImageTask(Task):
    name = "text_to_image"
    generates = "images"

    def build_model(self, model_config) -> nn.Module:
        return build_text_to_image_model(model_config)

    def inputs(self, config) -> tuple[str, ...]:
        return ("codes", "text") if config.data.codes_dir else ("image", "text")

    def step_batch(self, config, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """The loader's batch: 'text' and 'label', with 'image', or 'codes' int32 [B, h*w] when pre-tokenised."""
        shapes = super().step_batch(config, batch_size)
        if config.data.codes_dir:
            del shapes["image"]
            shapes["codes"] = jax.ShapeDtypeStruct((batch_size, code_grid(config.model) ** 2), jnp.int32)
        return shapes

    def objective(self, config, mesh: Mesh):
        return text_to_image_objective(config)

    def evaluate(self, config, model, params, mesh, rules, cache):
        return generation_eval(config, model, params, mesh, rules, cache)

    def config_problems(self, config) -> list[str]:
        return text_to_image_problems(config)

    def flops_per_example(self, config) -> float:
        """The generator as a text tower over T + N tokens, plus the frozen tokenizer's forward (a third of a
        training step's FLOPs) unless the data is pre-tokenised."""
        c = config.copy_and_resolve_references()
        o, model = c.model.text_to_image, build_text_to_image_model(config.model)
        c.model.text.update(width=o.width, depth=o.depth, num_heads=o.num_heads, mlp_dim=o.mlp_dim,
                            max_len=model.text_len + model.image_tokens)
        c.model.towers = ("text",)
        tokenizer = 0.0 if config.data.codes_dir else vq_flops_per_example(config.model) / 3.0  # forward only
        return train_flops_per_example(c, pooled_only=False) + tokenizer

    def prepare(self, config, workdir: str, train_fn: Callable, log: Callable = print):
        return prepare(config, workdir, train_fn, log)

    def sampler(self, config, model, batch_size: int) -> Sampler:
        """The image codes of `batch_size` captions at the default guidance scale (model.text_to_image.guidance;
        2 cache rows per caption when it is not 1), what `generate_images` samples before the tokenizer decodes."""
        o = config.model.text_to_image

        def fn(params, batch):
            return sample_codes(model, params, batch["text"], jax.random.key(0), guidance=float(o.guidance),
                                temperature=float(o.temperature), top_k=int(o.top_k), top_p=float(o.top_p))
        text = jax.ShapeDtypeStruct((batch_size, model.text_len), jnp.int32)
        return Sampler(fn, {"text": text}, f"{model.image_tokens} image codes per caption at guidance {o.guidance}")

    def inference_methods(self, config, model, params, mesh, rules, batch_size: int = 256) -> dict[str, Callable]:
        """What `mmjax.load` adds: generate_images (see `ImageGenerator.generate_images`)."""
        return {"generate_images": ImageGenerator(config, model, params, mesh, rules, batch_size).generate_images}
