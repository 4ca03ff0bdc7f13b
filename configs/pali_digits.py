"""PaLI-style multitask answering on the embedded digits and the spoken digits (task 'prefix_lm'), 2 CPU cores.

Run:
    mmjax train --config configs/pali_digits.py --workdir /tmp/pali1

A ViT (32x32 images, 8x8 patches: 17 tokens) and an audio tower (log-mel, 8-frame x 32-mel patches: 12 tokens),
projected to the width of a 2-block prefix-LM decoder; every batch mixes the seven tasks of
mmjax/data/multitask.py (caption en, what number, even, greater than K, plus K, transcribe, speaker match),
never drawing the held-out (task, K, digit) combinations below. The final evaluation answers greedily on the
360 held-out images (index % 5 == 0) and the 4 held-out voices, and writes vqa/<task>/accuracy and
vqa/heldout/<task>/accuracy to metrics.jsonl.

Measured (see docs/generative.md): filled in from the run below.
"""

from mmjax.config import base_config


def get_config(arg=None):
    c = base_config()
    c.seed = 0
    c.task = "prefix_lm"
    c.data.name = "digits_speech"

    c.model.towers = ("image", "text", "audio")  # 'text': the tokenizer section (model.text); no text tower
    c.model.image.update(image_size=32, patch_size=8, channels=3, width=64, depth=2, num_heads=4, mlp_dim=256,
                         pool="cls")
    c.model.audio.update(patch_time=8, patch_freq=32, width=64, depth=2, num_heads=4, mlp_dim=256)
    c.model.text.update(vocab_size=384, max_len=8, tokenizer="bytes")
    c.model.prefix_lm.update(width=64, depth=2, num_heads=4, mlp_dim=256, max_len=96, prompt_len=40,
                             answer_len=20)
    c.model.prefix_lm.tasks = (("caption", 1.0), ("what_number", 1.0), ("even", 1.0), ("greater", 1.5),
                               ("plus", 2.0), ("transcribe", 1.0), ("speaker_match", 1.0))
    # (task, K, digit) never trained on, scored as vqa/heldout/<task>/accuracy ("plus 3" never seen with a 6).
    c.model.prefix_lm.held_out = (("plus", 3, 6), ("plus", 5, 2), ("greater", 4, 7), ("greater", 6, 3))

    c.optim.lr = 3e-3
    c.optim.warmup_steps = 50
    c.optim.decay = "cosine"
    c.optim.weight_decay = 0.05

    c.train.steps = 500
    c.train.batch_size = 128
    c.train.log_every = 50
    c.checkpoint.every_steps = 250
    c.eval.zeroshot = False
    c.eval.batch_size = 512
    return c
