"""PaLI-like shapes for task 'prefix_lm': a ViT-L/16 image encoder (224 px, 196 patches + CLS, width 1024, 24
blocks) projected into a 1B-class prefix-LM decoder (width 2048, 24 blocks, 16 heads, MLP 8192, a 32,000-row
vocabulary: about 1.27B decoder parameters with the tied embedding), for v5p-256 (128 chips).

A shape config for `mmjax compile` (ahead-of-time compile and per-chip memory of the train step), trained on the
digits' task mixture only so that it runs as given; real use swaps in its own data and tokenizer
(model.text.tokenizer='sentencepiece' with model.text.tokenizer_path, vocab_size to match).

    mmjax compile --config configs/pali.py --topology v5p-256 --config.mesh.fsdp=16
"""

from mmjax.config import base_config


def get_config(arg=None):
    c = base_config()
    c.task = "prefix_lm"
    c.data.name = "digits"
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.model.towers = ("image", "text")  # 'text': the tokenizer section (model.text); no text tower
    c.model.image.update(image_size=224, patch_size=16, channels=3, width=1024, depth=24, num_heads=16,
                         mlp_dim=4096, pool="cls")
    c.model.text.update(vocab_size=32000, max_len=64, tokenizer="bytes")
    c.model.prefix_lm.update(width=2048, depth=24, num_heads=16, mlp_dim=8192, max_len=320, prompt_len=64,
                             answer_len=32)
    c.model.prefix_lm.held_out = ()

    c.optim.lr = 1e-4
    c.optim.warmup_steps = 1000
    c.optim.weight_decay = 0.1
    c.train.steps = 100_000
    c.train.batch_size = 1024
    c.eval.zeroshot = False
    return c
