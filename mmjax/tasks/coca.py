"""Task 'coca': CoCa, a contrastive captioner (`mmjax.models.coca`), trained on image-caption pairs.

Objective: the image-text contrastive loss (`model.loss`, softmax or sigmoid, `mmjax.losses.contrastive`) plus
`model.coca.captioning_weight` x the caption cross-entropy (teacher forcing: the logits after token l score token
l + 1; PAD targets are not scored, `mmjax.losses.fusion.mlm_loss`). Step metrics: 'contrastive_loss',
'caption_loss', 'caption_acc' (next-token accuracy), 'i2t_acc', 't2i_acc', 'logit_scale'.

On the labelled digits the stream's examples are 'described' (`mmjax.data.digit_captions`: the digit and
attributes measured from the pixels); on caption corpora, their captions.

Evaluation: the contrastive evaluators enabled in `config.eval` (zero-shot, retrieval, linear probe: the same
numbers as a CLIP's), and on the digits' held-out split captioning (`mmjax.eval.captioning`): the beam-search
captions (`coca.eval_beam` beams) under 'caption/digit_accuracy', 'caption/cider', 'caption/bleu4',
'caption/rouge_l', 'caption/logprob' (mean summed log-probability), the greedy captions under 'caption/greedy/...',
the most frequent training reference for every image under 'caption/baseline/...', and beam against greedy image
by image under 'caption/beam_vs_greedy/...' (the mean CIDEr-D difference with its 95 % bootstrap interval, and
the shares of images where beam's caption scores higher and lower: `captioning.paired_cider`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mmjax.config import BOS_ID, EOT_ID, PAD_ID, validation
from mmjax.data import pipeline
from mmjax.data.tokenizers import get_tokenizer
from mmjax.eval import captioning
from mmjax.losses import contrastive as contrastive_losses
from mmjax.losses.fusion import mlm_loss
from mmjax.models.coca import CocaModel, build_coca_model, coca_logits_fn
from mmjax.models.model import encoder_kwargs
from mmjax.runtime.flops import encoder_forward_flops, train_flops_per_example
from mmjax.tasks.base import Sampler, Task, dummy_batch, image_text_only_problems
from mmjax.tasks.contrastive import contrastive_evals

# model.text keys the unimodal text layers take (the others are the tokenizer's or a CLIP text tower's).
TEXT_FIELDS = ("vocab_size", "max_len", "width", "depth", "num_heads", "mlp_dim")


def text_kwargs(model_cfg) -> tuple:
    """`CocaTextEncoder` kwargs from model.text and the model-level fields, sorted (key, value) pairs."""
    kwargs = {k: model_cfg.text[k] for k in TEXT_FIELDS}
    kwargs.update(remat=str(model_cfg.get("remat", "none")), activation=str(model_cfg.get("activation", "gelu")),
                  dtype=jnp.dtype(model_cfg.get("dtype", "float32")),
                  param_dtype=jnp.dtype(model_cfg.get("param_dtype", "float32")))
    return tuple(sorted(kwargs.items()))


def caption_loss(logits: jax.Array, tokens: jax.Array) -> tuple[jax.Array, dict]:
    """logits float [B,L,V] (position l scores token l + 1), tokens int [B,L] -> (mean cross-entropy over the
    non-PAD targets tokens[:, 1:], {'caption_loss', 'caption_acc', 'caption_tokens'})."""
    targets = tokens[:, 1:]
    loss, m = mlm_loss(logits[:, :-1], targets, (targets != PAD_ID).astype(jnp.float32))
    return loss, {"caption_loss": loss, "caption_acc": m["mlm_acc"], "caption_tokens": m["mlm_count"]}


def coca_objective(loss_name: str, captioning_weight: float):
    """objective(model, params, batch, step) -> (contrastive + captioning_weight * caption CE, metrics)."""
    def objective(model, params, batch, step):
        del step
        out = model.apply({"params": params}, batch, train=True)
        contrastive, metrics = contrastive_losses.contrastive_loss(out, loss_name)
        caption, cap_metrics = caption_loss(out["caption_logits"], batch["text"])
        loss = contrastive + captioning_weight * caption
        metrics = dict(metrics, **cap_metrics, contrastive_loss=contrastive, logit_scale=out["logit_scale"])
        metrics["loss"] = loss
        return loss, metrics
    return objective


def max_new_tokens(config, prompt_len: int = 1) -> int:
    """Tokens a caption may have after a prompt of `prompt_len` tokens: model.coca.max_new_tokens (0: as many as
    the context allows), never past the context."""
    room = int(config.model.text.max_len) - prompt_len
    want = int(config.model.coca.max_new_tokens)
    return room if want <= 0 else min(want, room)


def caption_evals(config, model: nn.Module, params, mesh: Mesh, rules, cache: dict) -> dict[str, float]:
    """Captioning of the held-out split: beam (model.coca.eval_beam), greedy and the baseline (see the module
    docstring). On a caption corpus: its `eval.caption_split` with every reference of an image (no digit
    accuracy); {} when that is unset."""
    split = str(config.eval.get("caption_split", "") or "")
    if pipeline.is_captioned(config) and not split:
        return {}
    if "captions" not in cache:
        cache["captions"] = (captioning.corpus_caption_eval_data(config, split, int(config.eval.caption_examples))
                             if pipeline.is_captioned(config) else captioning.caption_eval_data(config))
    data = cache["captions"]
    tokenizer = get_tokenizer(config.model.text)
    results = captioning.baseline_metrics(data)
    beam, texts_of = int(config.model.coca.eval_beam), {}
    for prefix, k in (("caption/", beam), ("caption/greedy/", 1)):
        out = captioning.generate(model, coca_logits_fn(model), params, data["image"], np.array([BOS_ID]), mesh,
                                  rules, max_new_tokens=max_new_tokens(config), beam=k,
                                  batch_size=int(config.eval.batch_size), eos_id=EOT_ID, pad_id=PAD_ID)
        texts = texts_of[k] = tokenizer.decode(out["tokens"])
        results.update(captioning.captioning_metrics(texts, data, prefix))
        results[prefix + "logprob"] = float(np.mean(out["scores"]))
        if k == beam:
            cache["examples"] = texts[:8]
    if beam > 1:  # is beam search better than greedy beyond the noise of which images they differ on
        paired = captioning.paired_cider(texts_of[beam], texts_of[1], data["references"])
        results.update({"caption/beam_vs_greedy/" + k: v for k, v in paired.items()})
    return results


class CocaTask(Task):
    name = "coca"
    generates = "captions"

    examples = "described"  # digits: captions from the pixels (mmjax.data.digit_captions); corpora: their own

    def build_model(self, model_config) -> CocaModel:
        return build_coca_model(model_config, encoder_kwargs(model_config, "image"), text_kwargs(model_config))

    def objective(self, config, mesh: Mesh):
        return coca_objective(str(config.model.loss), float(config.model.coca.captioning_weight))

    def evaluate(self, config, model, params, mesh, rules, cache):
        return {**contrastive_evals(config, model, params, mesh, rules, cache),
                **caption_evals(config, model, params, mesh, rules, cache)}

    def config_problems(self, config) -> list[str]:
        c, problems = config.model.coca, image_text_only_problems(config, self.name)
        problems += validation.evaluator_problems(config)
        if config.model.image.pool != "cls":
            problems.append("model.image.pool: task 'coca' pools with its attentional pooler; keep 'cls'")
        for key in ("caption_queries", "pooler_heads", "decoder_depth", "cross_attention_every", "eval_beam"):
            if int(c[key]) < 1:
                problems.append(f"model.coca.{key} must be >= 1; got {c[key]}")
        width = int(c.pooler_width or config.model.text.width)
        if int(c.pooler_heads) >= 1 and width % int(c.pooler_heads):
            problems.append(f"model.coca.pooler_width {width} is not divisible by pooler_heads {c.pooler_heads}")
        heads = int(c.decoder_heads or config.model.text.num_heads)
        if config.model.text.width % heads:
            problems.append(f"model.coca.decoder_heads {heads} does not divide model.text.width")
        if float(c.captioning_weight) < 0:
            problems.append(f"model.coca.captioning_weight must be >= 0; got {c.captioning_weight}")
        if int(config.model.text.max_len) < 2:
            problems.append("model.text.max_len must be >= 2 (BOS and one generated token)")
        return problems

    def sampler(self, config, model, batch_size: int) -> Sampler:
        """Greedy captions after BOS, KV-cached (what `caption` and the captioning eval run with beam 1)."""
        n = max_new_tokens(config)
        fn = captioning.decode_fn(model, coca_logits_fn(model), n, beam=1, top_p=1.0, eos_id=EOT_ID, pad_id=PAD_ID,
                                  seed=0)
        inputs = {"image": dummy_batch(config, batch_size)["image"],
                  "prompt": jax.ShapeDtypeStruct((batch_size, 1), jnp.int32),
                  "prompt_len": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}
        return Sampler(fn, inputs, f"greedy captions of up to {n} tokens")

    def flops_per_example(self, config) -> float:
        c, txt = config.model.coca, config.model.text
        decoder = encoder_forward_flops(int(txt.max_len), int(txt.width), int(c.decoder_depth),
                                        int(c.decoder_mlp_dim or txt.mlp_dim))
        return train_flops_per_example(config) + 3.0 * decoder  # the towers + the multimodal blocks (fwd + bwd)
