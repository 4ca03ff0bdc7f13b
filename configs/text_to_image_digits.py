"""Text to image (task 'text_to_image') on the embedded handwritten digits: a 4-layer decoder over the caption
then the 16 codes (4x4 grid, 128-code codebook) of a VQ tokenizer of the 8x8 grayscale digits.

Run (trains the tokenizer first in /tmp/t2i/tokenizer, as configs/vq_digits.py does, when
image_tokenizer.workdir is empty):
    mmjax train --config configs/text_to_image_digits.py --workdir /tmp/t2i

Measured (one run, tokenizer 400 steps + generator 800 steps at batch 64, 0.39M trainable parameters; 2 CPU cores
shared with other jobs, load 8-10: 19 min wall, 392 CPU-seconds user + sys, of which the tokenizer 6 min wall;
re-evaluating a finished workdir takes 2.5 min), in /tmp/t2i/metrics.jsonl:
    gen/classifier_accuracy_real 0.958 (the independent classifier on real held-out images)
    gen/prompt_accuracy 0.856 at guidance 3 (0.106 / 0.644 / 0.781 / 0.856 at guidance 0 / 1 / 2 / 3)
    gen/discriminator_accuracy 0.742 (real vs the tokenizer's own reconstructions: 0.381)
    gen/nll_bits_per_token 3.90 vs gen/nll_baseline_bits_per_token 4.47
    gen/distinct_fraction 1.0, gen/training_copies 0.0, gen/unique_fraction 1.0
Not yet met: prompt accuracy >= 0.95 and discriminator <= 0.65, nor 10 minutes wall on these loaded cores.
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
                                 caption_dropout=0.1, guidance=3.0, eval_guidance=(0.0, 1.0, 2.0, 3.0))
    c.image_tokenizer.update(workdir="", steps=400, batch_size=128, lr=2e-3)

    c.optim.lr = 1.5e-3
    c.optim.warmup_steps = 50
    c.optim.decay = "cosine"
    c.optim.weight_decay = 0.05

    c.train.steps = 800
    c.train.batch_size = 64
    c.train.log_every = 50
    c.checkpoint.every_steps = 400
    c.eval.zeroshot = False
    return c
