"""Task 'flamingo': few-shot captioning with a frozen LM, a perceiver resampler and tanh-gated cross-attention
(`mmjax.models.flamingo`), on interleaved digit sequences (`mmjax.data.interleaved`).

Two stages, one task (`model.flamingo.stage`):
  - 'lm': the text-only LM on the captions alone (BOS 'seven. two. four. ...'), every parameter trained;
  - 'flamingo': the interleaved sequences (BOS '<image>seven.<|endofchunk|><image>two.<|endofchunk|>...'), the LM
    taken from a stage-'lm' workdir by `init_from` and frozen with the vision encoder (`optim.freeze_rules` must
    hold `mmjax.config.defaults.FLAMINGO_FREEZE_RULES`); the resampler, the gated blocks and the token rows of
    `<image>` and `<|endofchunk|>` train. The other token rows enter the loss under `stop_gradient` (zero
    gradients; AdamW gives them exactly zero updates, as embeddings get no weight decay), so they stay
    bit-identical.
The step reads a batch of single digits ('image', 'label' from the 'captions' stream) and packs every
`max_images` consecutive ones into one sequence (`interleaved.pack`), so `train.batch_size` counts images. The
loss is the next-token cross-entropy on every caption token, full stop and `<|endofchunk|>` (not on `<image>`
or padding); a sequence with nothing to predict adds nothing (`losses.fusion.mlm_loss`: 0, not NaN).

Evaluation (stage 'flamingo'): greedy generation after few-shot prompts, on the test split, support examples
from the train split (`interleaved.episodes`): 'fewshot/<k>shot/accuracy' (the first generated word is the
query's number word) for k in `shots`, and with `madeup_eval` 'fewshot/madeup/<k>shot/accuracy': 2-way episodes
whose two classes are named by made-up words that no training text contains.
`mmjax.load(W).generate(interleaved)` (`FlamingoTask.inference_methods`) writes the text after prompts mixing
strings and images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mmjax.config.defaults import FLAMINGO_FREEZE_RULES
from mmjax.data import interleaved, pipeline
from mmjax.data.digits import CLASS_NAMES
from mmjax.data.image import preprocess_images
from mmjax.data.tokenizers import get_tokenizer
from mmjax.eval.encoder import batched_apply
from mmjax.losses.fusion import mlm_loss
from mmjax.models.flamingo import FlamingoModel, build_flamingo_model, flamingo_generate, jit_generate
from mmjax.tasks.base import Sampler, Task, dummy_batch, image_text_only_problems

STAGES = ('lm', 'flamingo')


def text_only(config) -> bool:
    return config.model.flamingo.stage == 'lm'


def interleaver(config) -> interleaved.Interleaver:
    return interleaved.Interleaver(get_tokenizer(config.model.text))


def train_rows_only(params, rows: Sequence[int]):
    """params with the LM's token table 'lm/token_embed/embedding' [Vr,E] under `stop_gradient` except `rows`:
    the loss's gradient reaches only those rows."""
    table = params['lm']['token_embed']['embedding']
    trained = jnp.isin(jnp.arange(table.shape[0]), jnp.asarray(rows))[:, None]
    table = jnp.where(trained, table, jax.lax.stop_gradient(table))
    return {**params, 'lm': {**params['lm'], 'token_embed': {**params['lm']['token_embed'], 'embedding': table}}}


def lm_targets(tokens: jax.Array, image_id: int) -> tuple[jax.Array, jax.Array]:
    """tokens int [B,L] -> (targets [B,L]: the next token after each, weights float32 [B,L]: 1 where that next
    token is text to predict, 0 for `<image>`, padding and past the end)."""
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    weights = (targets != 0) & (targets != image_id)
    return targets, weights.astype(jnp.float32)


def flamingo_objective(config):
    """(model, params, batch {'image' [B,H,W,C], 'label' [B]}, step) -> (loss, metrics): B/S sequences of
    S = max_images digits each (the module docstring)."""
    inter = interleaver(config)
    lm_only, slots, max_len = text_only(config), int(config.model.flamingo.max_images), int(config.model.text.max_len)
    table, lengths = inter.chunk_table(CLASS_NAMES, text_only=lm_only)

    def objective(model, params, batch, step):
        del step
        labels = batch['label']
        n = labels.shape[0] // slots
        tokens = interleaved.pack(table, lengths, labels[:n * slots].reshape(n, slots), max_len)
        inputs = {'text': tokens}
        if not lm_only:
            images = batch['image'][:n * slots]
            inputs['image'] = images.reshape((n, slots) + images.shape[1:])
            params = train_rows_only(params, (inter.image_id, inter.eoc_id))
        logits = model.apply({'params': params}, inputs)
        targets, weights = lm_targets(tokens, inter.image_id)
        loss, m = mlm_loss(logits, targets, weights)
        return loss, {'token_accuracy': m['mlm_acc'], 'tokens': m['mlm_count']}
    return objective


def _padded(rows: list[list[int]]) -> np.ndarray:
    out = np.zeros((len(rows), max(map(len, rows))), np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def _first_word(text: str) -> str:
    return text.strip().split('.')[0].strip().split(' ')[0] if text.strip() else ''


def _eval_data(config, cache: dict) -> dict[str, np.ndarray]:
    if 'flamingo' not in cache:
        test, train = pipeline.load_eval_split(config, 'test'), pipeline.load_eval_split(config, 'train')
        limit = int(config.model.flamingo.eval_queries) or len(test['label'])
        cache['flamingo'] = {'query': test['image'][:limit], 'query_label': test['label'][:limit],
                             'support': train['image'], 'support_label': train['label']}
    return cache['flamingo']


def fewshot_accuracy(config, generate: Callable, params, data: dict[str, np.ndarray], shots: int, madeup: bool,
                     mesh: Mesh, rules) -> float:
    """Share of the queries whose generated first word is their expected word, after `shots` support
    examples (`interleaved.episodes`, seeded by model.flamingo.eval_seed)."""
    inter = interleaver(config)
    index, words, answers = interleaved.episodes(data['query_label'], data['support_label'], shots,
                                                 int(config.model.flamingo.eval_seed) + shots, madeup)
    prompts = _padded([inter.prompt(w) for w in words])
    images = np.concatenate([data['support'][index], data['query'][:, None]], axis=1)  # [Q, shots+1, H, W, C]
    out = batched_apply(lambda p, b: {'tokens': generate(p, b['prompts'], b['images']).tokens}, params,
                        {'prompts': prompts, 'images': images}, mesh, rules, int(config.eval.batch_size))
    said = [_first_word(inter.caption(row)) for row in out['tokens']]
    return float(np.mean([s == a for s, a in zip(said, answers)]))


def fewshot_eval(config, model: FlamingoModel, params, mesh: Mesh, rules, cache: dict) -> dict[str, float]:
    """'fewshot/<k>shot/accuracy' and 'fewshot/madeup/<k>shot/accuracy' (stage 'flamingo'; {} for 'lm')."""
    if text_only(config):
        return {}
    f, data = config.model.flamingo, _eval_data(config, cache)
    generate = cache.setdefault('flamingo_generate', jit_generate(model, int(f.max_new_tokens),
                                                                  interleaver(config).eoc_id))
    results = {}
    for madeup in (False, True) if f.madeup_eval else (False,):
        for k in tuple(f.shots):
            key = f"fewshot/{'madeup/' if madeup else ''}{int(k)}shot/accuracy"
            results[key] = fewshot_accuracy(config, generate, params, data, int(k), madeup, mesh, rules)
    results['fewshot/queries'] = float(len(data['query_label']))
    return results


class InterleavedGenerator:
    """`mmjax.load(W).generate`: the text a stage-'flamingo' model writes after interleaved prompts."""

    def __init__(self, config, model: FlamingoModel, params, mesh: Mesh, rules, batch_size: int = 256):
        self.config, self.model, self.params, self.mesh, self.rules = config, model, params, mesh, rules
        self.batch_size, self.inter = batch_size, interleaver(config)
        self._fns: dict[tuple[int, int], Callable] = {}

    def _example(self, parts) -> tuple[list[int], list[np.ndarray]]:
        """One prompt: strings (may hold '<image>' / '<|endofchunk|>') and images (uint8 [H,W(,C)]) -> (ids,
        images). A string after an image ends its chunk: `<|endofchunk|>` is added when another image follows."""
        text, images = '', []
        for i, part in enumerate(parts):
            if isinstance(part, str):
                text += part
                follows_image = any(not isinstance(p, str) for p in parts[i + 1:])
                if images and follows_image and not part.rstrip().endswith(interleaved.END_OF_CHUNK):
                    text += interleaved.END_OF_CHUNK
            else:
                text += interleaved.IMAGE_TOKEN
                images.append(np.asarray(part))
        ids = self.inter.parse(text)
        if ids.count(self.inter.image_id) != len(images):
            raise ValueError(f'generate: the prompt has {ids.count(self.inter.image_id)} {interleaved.IMAGE_TOKEN} '
                             f'markers but {len(images)} images')
        return ids, images

    def __call__(self, interleaved_prompts, max_new_tokens: int | None = None, beam: int = 1) -> list[str]:
        """interleaved_prompts: one prompt or a list of them, a prompt being a list of strings and images
        (uint8 [H,W] or [H,W,C], any size), e.g. [img7, 'seven.', img2, 'two.', query_img] -> the text each
        continues with, up to '<|endofchunk|>' (greedy; beam > 1: the best beam)."""
        if beam < 1:
            raise ValueError(f'generate: beam must be >= 1; got {beam}')
        prompts = list(interleaved_prompts)
        if prompts and not isinstance(prompts[0], (list, tuple)):
            prompts = [prompts]  # a single prompt
        examples = [self._example(p) for p in prompts]
        img, new = self.config.model.image, int(max_new_tokens or self.config.model.flamingo.max_new_tokens)
        slots = max(1, max(len(ims) for _, ims in examples))
        images = np.zeros((len(examples), slots, img.image_size, img.image_size, img.channels), np.float32)
        for row, (_, ims) in enumerate(examples):
            if ims:
                images[row, :len(ims)] = preprocess_images(list(ims), int(img.image_size), int(img.channels),
                                                           self.config.data.image_mean, self.config.data.image_std)
        tokens = _padded([ids for ids, _ in examples])
        if tokens.shape[1] + new > int(self.config.model.text.max_len):
            raise ValueError(f'generate: a prompt of {tokens.shape[1]} tokens plus {new} new ones exceeds the '
                             f'decoder context model.text.max_len={self.config.model.text.max_len}')
        fn = self._fns.setdefault((new, beam), jit_generate(self.model, new, self.inter.eoc_id, beam))
        out = batched_apply(lambda p, b: {'tokens': fn(p, b['prompts'], b['images']).tokens}, self.params,
                            {'prompts': tokens, 'images': images}, self.mesh, self.rules, self.batch_size)
        rows = out['tokens'] if beam == 1 else out['tokens'][:, 0]
        return [self.inter.caption(row) for row in rows]


def flamingo_problems(config) -> list[str]:
    """Task 'flamingo''s config checks (no I/O beyond building the tokenizer)."""
    f, t, problems = config.model.flamingo, config.model.text, image_text_only_problems(config, 'flamingo')
    if f.stage not in STAGES:
        return problems + [f'model.flamingo.stage: {f.stage!r}; choose one of {STAGES}']
    if config.data.name != 'digits':
        problems.append(f"data.name={config.data.name!r}: task 'flamingo' builds its sequences from the labelled "
                        f"digits; use data.name='digits'")
    slots = int(f.max_images)
    if slots < 1 or int(config.train.batch_size) % slots:
        problems.append(f'train.batch_size={config.train.batch_size} must be a multiple of model.flamingo.'
                        f'max_images={slots} (each sequence packs max_images digits)')
    if f.madeup_eval and any(int(k) % 2 for k in f.shots):
        problems.append(f'model.flamingo.shots={tuple(f.shots)}: the made-up-label episodes are 2-way and need '
                        f'even shot counts (or set model.flamingo.madeup_eval=False)')
    try:
        inter = interleaver(config)
    except (ValueError, OSError) as e:
        return problems + [f'model.text.tokenizer: {e}']
    if int(t.vocab_size) < inter.eoc_id + 1:
        problems.append(f'model.text.vocab_size={t.vocab_size}: the tokenizer uses {inter.image_id} ids and '
                        f"{interleaved.IMAGE_TOKEN} and {interleaved.END_OF_CHUNK} need 2 more")
    if text_only(config):  # stage 'lm' trains on text-only chunks of the number words and does not evaluate
        need = 1 + slots * max(len(inter.chunk(w, text_only=True)) for w in CLASS_NAMES)
    else:
        longest = max(len(inter.chunk(w)) for w in list(CLASS_NAMES) + list(interleaved.MADEUP_WORDS))
        need = max(1 + slots * longest, 2 + max(map(int, f.shots), default=0) * longest + int(f.max_new_tokens))
    if int(t.max_len) < need:
        problems.append(f'model.text.max_len={t.max_len} is shorter than the longest sequence ({need} tokens: '
                        f'{slots} training chunks, or {max(f.shots, default=0)} shots + the query + '
                        f'model.flamingo.max_new_tokens)')
    if f.stage == 'flamingo':
        missing = [r for r in FLAMINGO_FREEZE_RULES if r not in tuple(config.optim.freeze_rules)]
        if missing:
            problems.append(f'optim.freeze_rules: stage flamingo trains only the resampler, the gated blocks and '
                            f'the new token rows; add mmjax.config.defaults.FLAMINGO_FREEZE_RULES (missing {missing})')
        if int(f.cross_attention_every) < 1:
            problems.append('model.flamingo.cross_attention_every must be >= 1 in stage flamingo')
    return problems


class FlamingoTask(Task):
    name = 'flamingo'
    generates = "text"

    def inputs(self, config) -> tuple[str, ...]:
        return ('label',) if text_only(config) else ('image', 'label')

    def build_model(self, model_config) -> FlamingoModel:
        image_id, _ = interleaved.special_ids(get_tokenizer(model_config.text))
        return build_flamingo_model(model_config, image_id, text_only=model_config.flamingo.stage == 'lm')

    def dummy_batch(self, config, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        shapes = super().dummy_batch(config, batch_size)
        out = {'text': shapes['text']}
        if not text_only(config):
            image = shapes['image']
            out['image'] = jax.ShapeDtypeStruct((batch_size, 1) + image.shape[1:], image.dtype)
        return out

    def step_batch(self, config, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """The loader's batch: `batch_size` images [B,H,W,C] and their labels, which the objective packs into
        sequences of model.flamingo.max_images (no images for stage 'lm')."""
        shapes = dummy_batch(config, batch_size)
        out = {'label': jax.ShapeDtypeStruct((batch_size,), jnp.int32)}
        if not text_only(config):
            out['image'] = shapes['image']
        return out

    def objective(self, config, mesh: Mesh):
        return flamingo_objective(config)

    def evaluate(self, config, model, params, mesh, rules, cache) -> dict[str, float]:
        return fewshot_eval(config, model, params, mesh, rules, cache)

    def config_problems(self, config) -> list[str]:
        return flamingo_problems(config)

    def sampler(self, config, model, batch_size: int) -> Sampler | None:
        """Greedy text after interleaved prompts filling the context (model.text.max_len less
        model.flamingo.max_new_tokens) with model.flamingo.max_images images each; `batch_size` counts images as
        train.batch_size does (rows: batch_size // max_images). None for stage 'lm'."""
        if text_only(config):
            return None
        f = config.model.flamingo
        rows, n, images = max(1, batch_size // int(f.max_images)), int(f.max_new_tokens), int(f.max_images)
        image = dummy_batch(config, rows)["image"]
        inputs = {"prompts": jax.ShapeDtypeStruct((rows, int(config.model.text.max_len) - n), jnp.int32),
                  "images": jax.ShapeDtypeStruct((rows, images) + image.shape[1:], image.dtype)}
        eos = interleaver(config).eoc_id

        def fn(params, batch):
            return flamingo_generate(model, params, batch["prompts"], batch["images"], max_new_tokens=n,
                                     eos_id=eos).tokens
        return Sampler(fn, inputs, f"greedy text of up to {n} tokens after {images} images and "
                                   f"{inputs['prompts'].shape[1]} prompt tokens")

    def inference_methods(self, config, model, params, mesh, rules, batch_size: int = 256) -> dict[str, Callable]:
        """`mmjax.load(W).generate(interleaved)` (`InterleavedGenerator`); none for the text-only LM."""
        if text_only(config):
            return {}
        return {'generate': InterleavedGenerator(config, model, params, mesh, rules, batch_size)}
