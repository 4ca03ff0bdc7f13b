"""dalle-mini "mini" shapes for task 'text_to_image' (v5p-128): 24 decoder layers of width 1024 (the parameter
count of dalle-mini's 12 encoder + 12 decoder layers, as one prefix-LM decoder over text then image tokens),
captions of 64 tokens, 256 image tokens (16x16) from a 16,384-code VQ tokenizer at 256x256.

Run (a 16,384-code tokenizer of these shapes trained first, e.g. with task 'vq' and this file's model.vq):
    mmjax train --config configs/dalle_mini.py --workdir gs://BUCKET/dalle_mini \
        --config.data.name=spec --config.data.spec=gs://BUCKET/captions.json \
        --config.image_tokenizer.workdir=gs://BUCKET/vq16k \
        --config.init_from.path=gs://BUCKET/vq16k

Not trained here (no TPU in this project's sessions). `mmjax compile --config configs/dalle_mini.py --topology v5p-128`:
18.20 GiB per chip for the train step, 5.79 GiB for a sampler of 2,048 images (docs/generative.md, "Real shapes").
"""

from mmjax.config import base_config

TOKENIZER_REGEX = r"(encoder|quantizer|decoder)/.*"


def get_config(arg=None):
    c = base_config()
    c.task = "text_to_image"
    c.data.augment = False
    c.model.dtype = "bfloat16"
    c.model.image.update(image_size=256, channels=3)
    c.model.text.update(vocab_size=384, max_len=64, tokenizer="bytes")
    c.model.vq.update(widths=(128, 128, 256, 256, 512), res_blocks=2, code_dim=8, codebook_size=16384)
    c.model.text_to_image.update(width=1024, depth=24, num_heads=16, mlp_dim=4096, image_vocab=16384,
                                 caption_dropout=0.1, guidance=3.0, top_k=0, top_p=1.0)
    c.init_from.include = TOKENIZER_REGEX
    c.optim.freeze_rules = (TOKENIZER_REGEX,)
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 2000
    c.train.steps = 200_000
    c.train.batch_size = 2048
    c.mesh.update(data=-1, fsdp=8, tensor=1)
    c.eval.zeroshot = False
    return c
