"""A tiny config for tests: trains in seconds on CPU. Not for real use.

    mmjax train --config tests/tiny_config.py --workdir /tmp/tiny
"""

from mmjax.config import base_config


def get_config(arg=None):
    c = base_config()
    c.model.embed_dim = 16
    c.model.image.update(image_size=16, patch_size=4, width=32, depth=2, num_heads=2, mlp_dim=64)
    c.model.text.update(max_len=40, width=32, depth=2, num_heads=2, mlp_dim=64)
    c.optim.warmup_steps = 2
    c.train.steps = 8
    c.train.batch_size = 16
    c.train.log_every = 1
    c.checkpoint.every_steps = 4
    c.eval.zeroshot = False
    return c
