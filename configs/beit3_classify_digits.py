"""BEiT-3 as a fusion encoder: the multiway transformer of configs/beit3_digits.py (task 'mdm') fine-tuned on task
'classification' (does this caption describe this image? the image-caption matching pairs of the digits, labels
0/1), with `model.fusion.backbone='multiway'` (mmjax/models/multiway_classifier.py): the vision-language path
(`MultiwayModel.fuse`) of the pretrained stack, its image CLS and text BOS tokens concatenated into a new MLP head.
`get_config(arg)`: arg is the pretrained task 'mdm' workdir (init_from.path; every parameter of the stack loads by
name, the head starts fresh); without it the same classifier trains from scratch.

Run (after `mmjax train --config configs/beit3_digits.py:/tmp/vq_h --workdir /tmp/beit3_w5`):
    mmjax train --config configs/beit3_classify_digits.py:/tmp/beit3_w5 --workdir /tmp/beit3_cls
the same classifier from scratch, and a head-only fine-tune (the stack frozen):
    mmjax train --config configs/beit3_classify_digits.py --workdir /tmp/beit3_cls_scratch
    mmjax train --config configs/beit3_classify_digits.py:/tmp/beit3_w5 --workdir /tmp/beit3_cls_head \\
        --config.optim.freeze_rules="('(?!head/).*',)" --config.optim.lr=0.003

Expected: init_from loads the 84 tensors of the stack and initialises the 6 of the head; held-out
`classify/accuracy` (pairs from the 360 test images, fixed seed, 54.7 % matching) in <workdir>/metrics.jsonl.
Measured 2026-12-05 on 2 CPU cores shared with other jobs (CPU time = user + sys of `/usr/bin/time -v`), 500 steps
at batch 128: fine-tuned from /tmp/beit3_w5 0.947 (4 min 25 s wall at load average 4-5, 285 CPU-s; 3 min 36 s and
262 CPU-s at load 2.5-4.7); from scratch 0.453 (every pair "no match"; 2 min 21 s, 233 CPU-s at load 2; also
0.453 at lr 3e-3); head-only 0.578 (1 min 18 s, 98 CPU-s). 300 steps fine-tuned: 0.822 at lr 1e-3, 0.700 at 5e-4,
0.472 at 3e-3. docs/generative.md ("After pretraining") has the details and what is not supported.
"""

import os

from mmjax.config import load_config_file

_PRETRAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "beit3_digits.py")


def get_config(arg=None):
    c = load_config_file(_PRETRAIN)  # the pretraining config: the same stack and data, so the checkpoint loads
    c.task = "classification"
    c.image_tokenizer.workdir = ""  # not used by task 'classification'
    c.model.fusion.update(backbone="multiway", mode="concat", hidden=128, num_classes=2, contrastive_weight=0.0)
    c.init_from.path = arg or ""  # the task 'mdm' workdir; '' trains from scratch
    c.init_from.include = ".*"  # everything the classifier has: the stack (the head is not in the checkpoint)

    c.optim.lr = 1e-3
    c.optim.warmup_steps = 30
    c.optim.decay = "cosine"
    c.optim.weight_decay = 0.05

    c.train.steps = 500
    c.train.batch_size = 128
    c.train.log_every = 50
    c.checkpoint.every_steps = 250
    c.eval.zeroshot = False
    c.eval.retrieval = False
    c.eval.linear_probe = False
    return c
