"""Flamingo on the digits, stage 1: the text-only LM (task 'flamingo', model.flamingo.stage='lm').

    mmjax train --config configs/flamingo_lm_digits.py --workdir /tmp/flamingo_lm

It reads sequences of 8 number words without images (BOS 'seven. two. four. one. nine. ...'), so it knows the words
and their format but cannot tell which digit comes next (its best loss is about ln 10 per word; measured 0.387
per token after 400 steps, 5 min 9 s wall on 2 shared cores, 103 CPU-s). Stage 2
(configs/flamingo_digits.py) starts from this config (the same shapes), loads the LM with init_from and freezes
it.
"""

from mmjax.config import base_config


def get_config(arg=None):
    c = base_config()
    c.seed = 0
    c.task = "flamingo"
    c.data.name = "digits"
    c.model.text.update(vocab_size=384, max_len=64, width=64, depth=2, num_heads=4, mlp_dim=256,
                        tokenizer="bytes")
    # The vision tower of stage 2: configs/demo.py's contrastive ViT (loaded from its workdir there).
    c.model.image.update(image_size=32, patch_size=8, channels=3, width=64, depth=2, num_heads=4, mlp_dim=256,
                         pool="cls")
    c.model.flamingo.update(num_latents=8, resampler_depth=2, resampler_heads=4, resampler_mlp_dim=256,
                            cross_attention_every=1, max_images=5)
    c.eval.zeroshot = False
    c.checkpoint.async_save = False
    c.model.flamingo.stage = "lm"
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 10
    c.optim.weight_decay = 0.01
    # 8 words per sequence (up to 57 byte positions): every position stage 2's sequences of 5 images reach
    # (<image> and <|endofchunk|> make them longer: 41, and a few more while generating) is trained here.
    c.model.flamingo.max_images = 8
    c.train.steps = 400
    c.train.batch_size = 320  # digits: 40 sequences of 8 words
    c.train.log_every = 20
    c.checkpoint.every_steps = 400
    return c
