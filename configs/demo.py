"""Demo: a small CLIP on the embedded handwritten-digits image-caption data, 2 CPU cores.

Run:
    mmjax train --config configs/demo.py --workdir /tmp/mmjax_demo

Expected: about 6 minutes on 2 CPU cores (first run also builds the dataset, ~20 s); ends with
`zeroshot/top1` >= 0.90 on the 360 held-out digit images (index % 5 == 0), written to
/tmp/mmjax_demo/metrics.jsonl. Running it again on the same workdir resumes from the latest
checkpoint (and, when finished, only re-evaluates).
"""

from mmjax.config import base_config


def get_config(arg=None):
    c = base_config()
    c.seed = 0
    c.data.name = "digits"

    c.model.embed_dim = 64
    c.model.loss = "softmax"
    c.model.image.update(image_size=32, patch_size=8, channels=3, width=64, depth=2, num_heads=4,
                         mlp_dim=256, pool="cls")
    c.model.text.update(vocab_size=384, max_len=40, width=64, depth=2, num_heads=4, mlp_dim=256,
                        causal=True, pool="eot", tokenizer="bytes")

    c.optim.lr = 2e-3
    c.optim.warmup_steps = 50
    c.optim.decay = "cosine"
    c.optim.weight_decay = 0.05

    c.train.steps = 800
    c.train.batch_size = 128
    c.train.log_every = 50
    c.checkpoint.every_steps = 200
    return c
