"""CoCa on the embedded digits, 2 CPU cores: one model that zero-shot classifies and captions.

Run:
    mmjax train --config configs/coca_digits.py --workdir /tmp/coca1
    mmjax generate --workdir /tmp/coca1 --images a.png b.png [--beam 4 | --top-p 0.9]

Captions are 'described' (mmjax/data/digit_captions.py): the digit word and its stroke, slant and width measured
from the pixels, five references per image (docs/generative.md, "Captioning (task='coca')").

Measured (this config, held-out 360 digits; shared 2-core CPU with 2-4 other trainings: 21m30s wall, 427 s
user + 121 s system CPU): caption/digit_accuracy 0.9889 (beam 4; greedy 0.9861), caption/cider 3.8891 (greedy
4.0215; most-frequent-caption baseline 0.3890), caption/bleu4 0.9743 (greedy 0.8969, baseline 0.4651),
caption/rouge_l 0.9874 (greedy 0.9546, baseline 0.8240), caption/reference_match 0.9222 (captions entirely
right; greedy 0.7583, baseline 0.0417), caption/logprob -1.685 (greedy -1.930),
zeroshot/top1 0.9722 (prompts phrased as the captions; 0.939 with the generic CLIP prompts), zeroshot/top5 1.0.
Greedy's higher CIDEr-D is its template mix: a correct caption scores 3.73-4.46 by template (docs/generative.md).
"""

from mmjax.config import base_config
from mmjax.data import digit_captions


def get_config(arg=None):
    c = base_config()
    c.seed = 0
    c.task = "coca"
    c.data.name = "digits"

    c.model.embed_dim = 64
    c.model.loss = "softmax"
    c.model.image.update(image_size=32, patch_size=8, channels=3, width=64, depth=2, num_heads=4,
                         mlp_dim=256, pool="cls")
    c.model.text.update(vocab_size=384, max_len=48, width=64, depth=2, num_heads=4, mlp_dim=256,
                        causal=True, pool="eot", tokenizer="bytes")
    c.model.coca.update(caption_queries=16, pooler_width=64, pooler_heads=4, decoder_depth=2,
                        cross_attention_every=1, captioning_weight=0.5, eval_beam=4, max_new_tokens=0)

    c.optim.lr = 2e-3
    c.optim.warmup_steps = 50
    c.optim.decay = "cosine"
    c.optim.weight_decay = 0.05

    # Zero-shot prompts phrased as the training captions are, averaged over the attribute words (18 per class).
    c.eval.zeroshot_templates = digit_captions.zeroshot_templates()

    c.train.steps = 1000
    c.train.batch_size = 128
    c.train.log_every = 50
    c.checkpoint.every_steps = 500
    return c
