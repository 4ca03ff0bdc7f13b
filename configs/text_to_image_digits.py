"""Text to image (task 'text_to_image') on the embedded handwritten digits: a 3-layer decoder over the caption
then the 16 codes (4x4 grid, 128-code codebook) of a VQ tokenizer of the 8x8 grayscale digits.

Run (trains the tokenizer first in /tmp/t2i/tokenizer, as configs/vq_digits.py does, when
image_tokenizer.workdir is empty):
    mmjax train --config configs/text_to_image_digits.py --workdir /tmp/t2i

Measured (2026-12-05; generator 1,200 steps at batch 64 with input noise 0.4, 0.39M trainable parameters, on the
tokenizer this config trained in an earlier run (400 steps, /tmp/t2i/tokenizer); 2 CPU cores shared with two other
jobs, load ~6: 11 min 39 s wall, 255 s user + 122 s system for the generator and its evaluation; the tokenizer
alone takes ~72 CPU-seconds), in metrics.jsonl:
    gen/classifier_accuracy_real 0.958 (the independent classifier on real held-out images)
    gen/prompt_accuracy 0.988 at guidance 1.5 (0.131 / 0.694 / 0.925 / 0.988 at guidance 0 / 0.5 / 1 / 1.5)
    gen/discriminator_accuracy 0.690 (real vs the tokenizer's own reconstructions: 0.381)
    gen/nll_bits_per_token 3.74 vs gen/nll_baseline_bits_per_token 4.47
    gen/distinct_fraction 1.0, gen/training_copies 0.0, gen/unique_fraction 1.0
Not yet met: discriminator <= 0.65 (0.68-0.72 at every guidance, temperature and size tried; docs/generative.md).
"""

from mmjax.config import base_config


def get_config(arg=None):
    c = base_config()
    c.seed = 0
    c.task = "text_to_image"
    c.data.name = "digits"
    c.data.augment = False  # the generator learns the images as the tokenizer sees them
    c.data.image_mean, c.data.image_std = (0.5,), (0.5,)

    c.model.image.update(image_size=8, patch_size=4, channels=1)  # patch_size: unused
    c.model.text.update(vocab_size=384, max_len=40, tokenizer="bytes")
    c.model.vq.update(widths=(32, 64), res_blocks=1, code_dim=8, codebook_size=128, recon_loss="l2",
                      codebook_weight=1.0, commitment_weight=0.25, restart_weight=1.0)
    c.model.text_to_image.update(width=96, depth=3, num_heads=4, mlp_dim=384, image_vocab=128,
                                 caption_dropout=0.1, input_noise=0.4, guidance=1.5,
                                 eval_guidance=(0.0, 0.5, 1.0, 1.5))
    c.image_tokenizer.update(workdir="", steps=400, batch_size=128, lr=2e-3)

    c.optim.lr = 1.5e-3
    c.optim.warmup_steps = 50
    c.optim.decay = "cosine"
    c.optim.weight_decay = 0.05

    c.train.steps = 1200
    c.train.batch_size = 64
    c.train.log_every = 50
    c.checkpoint.every_steps = 600
    c.eval.zeroshot = False
    return c
