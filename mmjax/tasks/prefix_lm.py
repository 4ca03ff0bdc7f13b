"""Task 'prefix_lm': PaLI-style multitask answering. Image (and spoken-digit audio) tokens plus a text prefix that
names the task go into one prefix-LM decoder (`mmjax.models.pali.PrefixLM`), which writes the answer.

The training stream is the digits' (data.name 'digits', or 'digits_speech' with an audio tower: each example
also carries a clip of its digit). Inside the step, `mix_batch` draws for every example a task by the weights
of `model.prefix_lm.tasks`, its K and, for speaker_match, whose clip it hears (its own or a random row's), never a
(task, K, digit) of `model.prefix_lm.held_out` (`mmjax.data.multitask`). Objective: cross-entropy on the answer
tokens (and EOT) only. Evaluation (`mmjax.eval.vqa`): greedy answers on the held-out images and voices,
exact match after normalisation per task ('vqa/<task>/accuracy', 'vqa/heldout/<task>/accuracy').
`mmjax.load(W).answer(images, questions)` is `Answerer.answer`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from mmjax import config as config_lib
from mmjax.config import BOS_ID, PAD_ID
from mmjax.data import multitask
from mmjax.data.image import preprocess_images
from mmjax.data.tokenizers import get_tokenizer
from mmjax.errors import MmjaxError
from mmjax.eval import vqa
from mmjax.models import pali
from mmjax.runtime.flops import audio_forward_flops, encoder_forward_flops, image_forward_flops
from mmjax.tasks.base import Sampler, Task, dummy_batch

SPEAKER = multitask.TASK_NAMES.index('speaker_match')
MIX_SEED = 0x9A11  # folded into config.seed: the mixture's draws differ from the data pipeline's


def mix_batch(key: jax.Array, labels: jax.Array, tables: multitask.MixtureTables, num_media: int) -> dict:
    """Draws the batch's tasks. labels int [B] (each example's digit; its clip says the same digit) ->
    {'tokens' int32 [B,S] (S = num_media + Lp + 1 + La, see `multitask.sequence`), 'task', 'k', 'digit',
    'partner' int32 [B] (the row whose clip the example hears), 'media' float32 [B,2]}.

    Task t is drawn with probability weights[t] among the tasks with an allowed K for the digit (speaker_match:
    allowed for the drawn match), K uniformly among the allowed ones."""
    allowed, weights = jnp.asarray(tables.allowed), jnp.asarray(tables.weights, jnp.float32)
    k_task, k_k, k_match, k_other = jax.random.split(key, 4)
    b = labels.shape[0]
    rows = jnp.arange(b, dtype=jnp.int32)
    partner = jnp.where(jax.random.bernoulli(k_match, 0.5, (b,)), rows,
                        jax.random.randint(k_other, (b,), 0, b, jnp.int32))
    same = (labels[partner] == labels).astype(jnp.int32)
    possible = jnp.any(allowed[:, :, labels], axis=1).T  # [B,T]
    possible = possible.at[:, SPEAKER].set(allowed[SPEAKER, same, labels])
    task_logits = jnp.where(possible & (weights > 0), jnp.log(jnp.maximum(weights, 1e-30)), -jnp.inf)
    task = jax.random.categorical(k_task, task_logits).astype(jnp.int32)
    k = jax.random.categorical(k_k, jnp.where(allowed[task, :, labels], 0.0, -jnp.inf)).astype(jnp.int32)
    k = jnp.where(task == SPEAKER, same, k)
    tokens = jnp.concatenate([jnp.full((b, num_media), PAD_ID, jnp.int32), jnp.asarray(tables.prompts)[task, k],
                              jnp.full((b, 1), BOS_ID, jnp.int32), jnp.asarray(tables.answers)[task, k, labels]],
                             axis=1)
    return {'tokens': tokens, 'task': task, 'k': k, 'digit': labels.astype(jnp.int32),
            'partner': jnp.where(task == SPEAKER, partner, rows), 'media': jnp.asarray(tables.media)[task]}


def answer_loss(logits: jax.Array, tokens: jax.Array, answer_start: int) -> tuple[jax.Array, dict]:
    """logits float [B,S-1,V] of tokens[:, :-1], tokens int [B,S] whose answer starts at `answer_start` ->
    (mean cross-entropy over the answer tokens and EOT, {'loss', 'answer_token_accuracy', 'answer_exact'}).
    Positions before the answer (media, prompt, BOS) and the pads after EOT carry no loss."""
    targets = tokens[:, 1:]
    positions = jnp.arange(targets.shape[1])[None]
    mask = ((positions >= answer_start - 1) & (targets != PAD_ID)).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    count = jnp.maximum(mask.sum(), 1.0)
    loss = (ce * mask).sum() / count
    right = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    exact = jnp.all((right > 0) | (mask == 0), axis=1).astype(jnp.float32).mean()
    return loss, {'loss': loss, 'answer_token_accuracy': (right * mask).sum() / count, 'answer_exact': exact}


def model_inputs(batch: dict, ex: dict) -> dict:
    """The PrefixLM inputs of a training batch and its drawn tasks `ex` (`mix_batch`): the image, the clip of
    each row's partner, the media flags and the sequence without its last token."""
    inputs = {'image': batch['image'], 'media': ex['media'], 'tokens': ex['tokens'][:, :-1]}
    if 'audio' in batch:
        inputs['audio'] = jax.tree.map(lambda a: a[ex['partner']], batch['audio'])
    return inputs


def prefix_lm_objective(config):
    """objective(model, params, batch, step): `mix_batch` (keyed by config.seed and the step), then
    `answer_loss` of the PrefixLM on the drawn sequences."""
    tables = multitask.mixture_tables(config.model.prefix_lm, get_tokenizer(config.model.text))
    num_media = sum(pali.media_slots(config.model))
    answer_start = num_media + int(config.model.prefix_lm.prompt_len) + 1
    seed = int(config.seed)

    def objective(model, params, batch, step):
        key = jax.random.fold_in(jax.random.key(seed ^ MIX_SEED), step)
        ex = mix_batch(key, batch['label'], tables, num_media)
        logits = model.apply({'params': params}, model_inputs(batch, ex), train=True)
        return answer_loss(logits, ex['tokens'], answer_start)

    return objective


class Answerer:
    """`mmjax.load(W).answer`: greedy answers of a trained prefix-LM to questions about images (and clips)."""

    def __init__(self, config, model: nn.Module, params, mesh: Mesh, rules, batch_size: int = 256):
        self.config, self.params, self.mesh, self.rules, self.batch_size = config, params, mesh, rules, batch_size
        self.tokenizer = get_tokenizer(config.model.text)
        self.tables = multitask.mixture_tables(config.model.prefix_lm, self.tokenizer)
        self.audio = 'audio' in config_lib.model_towers(config)
        self.fn = vqa.answer_fn(model, int(config.model.prefix_lm.answer_len))

    def prompt_ids(self, question: str) -> tuple[np.ndarray, np.ndarray]:
        """(prefix ids int32 [Lp], media flags float32 [2]); warns for a prefix the model was not trained on."""
        pl = self.config.model.prefix_lm
        ids = self.tokenizer.text_to_ids(question)
        if len(ids) > int(pl.prompt_len):
            raise MmjaxError(f'the prompt {question!r} is {len(ids)} tokens; this model reads at most '
                             f'{pl.prompt_len} (model.prefix_lm.prompt_len, its decoder context: {pl.max_len})')
        known = multitask.identify_prompt(question)
        trained = known is not None and self.tables.weights[multitask.TASK_NAMES.index(known[0])] > 0
        if not trained:
            warnings.warn(f'mmjax: the prefix {question!r} names no task this model was trained on (trained: '
                          f'{[t for t, w in zip(multitask.TASK_NAMES, self.tables.weights) if w > 0]}); '
                          f'its answer is a guess', stacklevel=3)
        media = self.tables.media[multitask.TASK_NAMES.index(known[0])] if known else np.array([1.0, 0.0])
        return multitask.encode_padded(self.tokenizer, question, int(pl.prompt_len), 'prompt'), media

    def answer(self, images, questions: Sequence[str] | str, audio: np.ndarray | None = None) -> list[str]:
        """images uint8 [N,H,W(,C)] (any size and channel count, converted as `encode_image` does), questions:
        N prefixes (or one for all), audio: optional float32 [N,S] 16 kHz waveforms (transcribe,
        speaker_match) -> N answers."""
        cfg = self.config
        img = preprocess_images(np.asarray(images), cfg.model.image.image_size, cfg.model.image.channels,
                                cfg.data.image_mean, cfg.data.image_std)
        questions = [questions] * len(img) if isinstance(questions, str) else list(questions)
        if len(questions) != len(img):
            raise MmjaxError(f'answer: {len(img)} images but {len(questions)} questions')
        prompts, media = (np.stack(x) for x in zip(*(self.prompt_ids(q) for q in questions)))
        inputs = {'image': img, 'prompt': prompts, 'media': media.astype(np.float32)}
        if self.audio:
            inputs.update(vqa.clip_inputs(cfg, audio, len(img)))
        elif audio is not None or media[:, 1].any():
            raise MmjaxError('answer: this model has no audio tower (model.towers), so it cannot hear clips')
        return vqa.run_answers(self.fn, self.params, inputs, self.tokenizer, self.mesh, self.rules, self.batch_size)


def prefix_lm_problems(config) -> list[str]:
    """What task 'prefix_lm' checks in the config (no I/O): towers, data, tasks, held-out combinations, and that
    the sequence fits the decoder."""
    m, pl = config.model, config.model.prefix_lm
    towers, problems = config_lib.model_towers(config), []
    if 'image' not in towers:
        problems.append(f"model.towers={towers!r}: task 'prefix_lm' needs the image tower")
    if config.data.name not in ('digits', 'digits_speech'):
        problems.append(f"data.name={config.data.name!r}: task 'prefix_lm' trains on the labelled digits "
                        f"('digits', or 'digits_speech' for the audio tasks)")
    names = [str(t) for t, _ in pl.tasks]
    unknown = [t for t in names + [str(h[0]) for h in pl.held_out] if t not in multitask.TASK_NAMES]
    if unknown or len(set(names)) != len(names):
        problems.append(f'model.prefix_lm.tasks / held_out: unknown or repeated tasks {unknown or names}; the '
                        f'tasks are {multitask.TASK_NAMES}')
        return problems
    weights = dict((str(t), float(w)) for t, w in pl.tasks)
    if any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
        problems.append(f'model.prefix_lm.tasks: weights must be >= 0 with one > 0; got {dict(weights)}')
    hearing = [t for t in multitask.AUDIO_TASKS if weights.get(t, 0) > 0]
    if hearing and ('audio' not in towers or config.data.name != 'digits_speech'):
        problems.append(f"model.prefix_lm.tasks: {hearing} hear clips: add 'audio' to model.towers and use "
                        f"data.name='digits_speech' (or give them weight 0)")
    for task, k, digit in pl.held_out:
        if not (0 <= int(digit) < multitask.NUM_DIGITS and (int(k) == -1 or int(k) in multitask.task_ks(task))):
            problems.append(f'model.prefix_lm.held_out: ({task!r}, {k}, {digit}): K must be one of '
                            f'{multitask.task_ks(task)} or -1 (all), the digit 0..9')
    if problems:
        return problems
    length = pali.sequence_length(m)
    if length > int(pl.max_len):
        problems.append(f'model.prefix_lm.max_len={pl.max_len}: a sequence needs {length} positions '
                        f'({sum(pali.media_slots(m))} media + prompt_len {pl.prompt_len} + BOS + answer_len '
                        f'{pl.answer_len}); raise max_len or shorten them')
    if int(pl.width) % int(pl.num_heads):
        problems.append(f'model.prefix_lm.width={pl.width} is not divisible by num_heads={pl.num_heads}')
    try:
        tables = multitask.mixture_tables(pl, get_tokenizer(m.text))
    except ValueError as e:
        return problems + [str(e)]
    trained = (tables.allowed & (tables.weights[:, None, None] > 0)).any(axis=(0, 1))
    if not trained.all():
        problems.append(f'model.prefix_lm.held_out leaves the digits {np.flatnonzero(~trained).tolist()} with no '
                        f'task to train on')
    return problems


def _other_problems(config) -> list[str]:
    problems = []
    if config.model.loss_impl != 'plain':
        problems.append(f"model.loss_impl={config.model.loss_impl!r} is for task 'contrastive'; use 'plain'")
    if config.train.micro_batches > 1:
        problems.append(f"train.micro_batches={config.train.micro_batches}: gradient accumulation is implemented "
                        f"for task 'contrastive' only; set it to 1 for task 'prefix_lm'")
    if config.finetune.mode != 'none':
        problems.append(f"finetune.mode={config.finetune.mode!r} is only supported with task 'contrastive'; use "
                        f"finetune.mode='none' for task 'prefix_lm' (optim.freeze_rules freezes parts)")
    return problems


def prefix_lm_flops_per_example(config) -> float:
    """3 x forward FLOPs: the towers' tokens, the decoder over the training sequence and its logits."""
    m, pl = config.model, config.model.prefix_lm
    forward = image_forward_flops(m.image, 0)
    if 'audio' in config_lib.model_towers(config):
        forward += audio_forward_flops(m.audio, 0)
    length = pali.sequence_length(m) - 1
    forward += encoder_forward_flops(length, int(pl.width), int(pl.depth), int(pl.mlp_dim))
    return 3.0 * (forward + 2.0 * length * int(pl.width) * int(m.text.vocab_size))


class PrefixLMTask(Task):
    name = 'prefix_lm'
    generates = "text"

    def inputs(self, config) -> tuple[str, ...]:
        return ('image', 'label', 'audio') if 'audio' in config_lib.model_towers(config) else ('image', 'label')

    def build_model(self, model_config) -> nn.Module:
        return pali.build_prefix_lm(model_config)

    def dummy_batch(self, config, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        shapes = {k: v for k, v in dummy_batch(config, batch_size).items() if k != 'text'}
        return dict(shapes, label=jax.ShapeDtypeStruct((batch_size,), jnp.int32))

    def objective(self, config, mesh: Mesh):
        return prefix_lm_objective(config)

    def evaluate(self, config, model, params, mesh, rules, cache):
        return vqa.vqa_eval(config, model, params, mesh, rules, cache)

    def config_problems(self, config) -> list[str]:
        return prefix_lm_problems(config) + _other_problems(config)

    def flops_per_example(self, config) -> float:
        return prefix_lm_flops_per_example(config)

    def sampler(self, config, model, batch_size: int) -> Sampler:
        """Greedy answers after the media and a prompt of model.prefix_lm.prompt_len ids (`pali.generate`, what
        `answer` and the VQA eval run)."""
        pl, shapes = config.model.prefix_lm, dummy_batch(config, batch_size)
        n = int(pl.answer_len)
        inputs = {"image": shapes["image"], "prompt": jax.ShapeDtypeStruct((batch_size, int(pl.prompt_len)), jnp.int32),
                  "media": jax.ShapeDtypeStruct((batch_size, 2), jnp.float32)}
        if "audio" in shapes:
            inputs["audio"] = {"waveform": shapes["audio"], "length": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}

        def fn(params, batch):
            return pali.generate(model, {"params": params}, batch, n).tokens
        return Sampler(fn, inputs, f"greedy answers of up to {n} tokens after a {pl.prompt_len}-id prompt")

    def inference_methods(self, config, model, params, mesh, rules, batch_size: int = 256) -> dict[str, Callable]:
        """What `mmjax.load` adds: {'answer': `Answerer.answer`}."""
        return {'answer': Answerer(config, model, params, mesh, rules, batch_size).answer}
