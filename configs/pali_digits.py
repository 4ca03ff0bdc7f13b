"""PaLI-style multitask answering on the embedded digits and the spoken digits (task 'prefix_lm'), 2 CPU cores.

Run:
    mmjax train --config configs/demo.py --workdir /tmp/mmjax_demo           # the contrastive image tower
    mmjax train --config configs/pali_digits.py:/tmp/mmjax_demo --workdir /tmp/pali1

The argument is a contrastive run whose image tower PaLI starts from and keeps frozen, as PaLI does with its
pretrained ViT (default /tmp/mmjax_demo; init_from renames 'image/encoder/...' -> 'image/...'). A ViT (32x32
images, 8x8 patches: 17 tokens) and an audio tower (log-mel, 8-frame x 32-mel patches: 12 tokens),
projected to the width of a 2-block prefix-LM decoder; every batch mixes the seven tasks of
mmjax/data/multitask.py (caption en, what number, even, greater than K, plus K, transcribe, speaker match),
never drawing the held-out (task, K, digit) combinations below. The final evaluation answers greedily on the
360 held-out images (index % 5 == 0) and the 4 held-out voices, and writes vqa/<task>/accuracy and
vqa/heldout/<task>/accuracy to metrics.jsonl.

Measured (docs/generative.md, "Multitask VQA"): vqa/what_number 0.978, even 0.989, greater 0.994 (held-out
combinations 0.811), plus 0.978 (held-out combinations 0.000), transcribe on unseen voices 0.996, speaker_match
0.997, caption 0.978; vqa/accuracy 0.987.
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

    c.init_from.path = arg or "/tmp/mmjax_demo"
    c.init_from.include = "image/.*"
    c.init_from.rename = ((r"image/encoder/(.*)", r"image/\1"),)
    c.optim.freeze_rules = ("image/.*",)

    c.optim.lr = 3e-3
    c.optim.warmup_steps = 50
    c.optim.decay = "cosine"
    c.optim.weight_decay = 0.05

    c.train.steps = 1200
    c.train.batch_size = 128
    c.train.log_every = 50
    c.checkpoint.every_steps = 400
    c.eval.zeroshot = False
    c.eval.batch_size = 512
    return c
