"""Flamingo on the digits, stage 2: few-shot captioning with the frozen text-only LM (task 'flamingo').

    mmjax train --config configs/demo.py --workdir /tmp/mmjax_demo                  # the contrastive vision tower
    mmjax train --config configs/flamingo_lm_digits.py --workdir /tmp/flamingo_lm   # the text-only LM
    mmjax train --config configs/flamingo_digits.py:/tmp/flamingo_lm,/tmp/mmjax_demo --workdir /tmp/flamingo

The argument is 'LM workdir,vision workdir' (default '/tmp/flamingo_lm,/tmp/mmjax_demo'), both loaded by
init_from: the LM from the stage-1 run, the ViT from the demo CLIP's image tower (renamed 'image/encoder/...' ->
'vision/...'), as Flamingo takes a contrastively pretrained vision encoder. Frozen (`FLAMINGO_FREEZE_RULES`):
the ViT and the LM; trained: the perceiver resampler, the tanh-gated cross-attention of every LM block and the
token rows of <image> and <|endofchunk|>. Sequences: '<image>seven.<|endofchunk|>' x 5 digits of the train split.
Evaluation on the 360 held-out test digits, support examples from the train split, greedy:
fewshot/{0,2,4}shot/accuracy, and the 2-way made-up-label episodes fewshot/madeup/{0,2,4}shot/accuracy.

Measured (docs/generative.md, "Few-shot (task='flamingo')"): fewshot/0shot 0.983, 2shot 0.983, 4shot 0.983;
madeup 0/2/4 shot 0.000; 3 min 49 s wall on 2 shared cores (145 CPU-s).
"""

import os

from mmjax.config import load_config_file
from mmjax.config.defaults import FLAMINGO_FREEZE_RULES


def get_config(arg=None):
    # Stage 1's config (the shared shapes), turned into stage 2.
    c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "flamingo_lm_digits.py"))
    c.model.flamingo.stage = "flamingo"
    lm, vision = ((arg or "").split(",") + ["", ""])[:2]
    lm, vision = lm or "/tmp/flamingo_lm", vision or "/tmp/mmjax_demo"
    c.init_from.path = lm
    c.init_from.include = "lm/.*"
    c.init_from.more = (dict(path=vision, include="vision/.*", rename=((r"image/encoder/(.*)", r"vision/\1"),)),)
    c.model.flamingo.max_images = 5
    c.optim.freeze_rules = FLAMINGO_FREEZE_RULES
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 20
    c.optim.weight_decay = 0.01
    c.train.steps = 400
    c.train.batch_size = 160  # 32 sequences of 5 digits
    c.train.log_every = 25
    c.checkpoint.every_steps = 400
    return c
