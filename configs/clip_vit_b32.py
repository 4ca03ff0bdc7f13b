"""CLIP ViT-B/32 (the OpenAI / open_clip shape) for accelerators: 151M parameters, bf16 compute.

Shape: image 224x224, patch 32 (50 tokens), width 768, 12 layers, 12 heads, MLP 3072; text 77 tokens,
width 512, 12 layers, 8 heads; joint embedding 512; InfoNCE with learned temperature; AdamW lr 5e-4,
wd 0.2, b2 0.98, 10k warmup steps, cosine decay; global batch 32,768 as in the CLIP paper.

Meshes (the model is small: data parallelism with the weights and optimizer state sharded by fsdp;
check one ahead of time with `mmjax compile`, needs `pip install -e '.[tpu]'`):
    v4-128   (64 chips, 32 GiB):  --config.mesh.data=1 --config.mesh.fsdp=-1            (fsdp=64)
    v5e-256  (256 chips, 16 GiB): --config.mesh.data=1 --config.mesh.fsdp=-1            (fsdp=256)
    v5p-256  (128 chips, 95 GiB): --config.mesh.data=-1                                 (data=128)
    v6e-256  (256 chips, 32 GiB): --config.mesh.data=1 --config.mesh.fsdp=-1            (fsdp=256)
  e.g. mmjax compile --config configs/clip_vit_b32.py --topology v5e-256 --json b32_v5e256.json

Run (a TPU pod; see launch/README.md; the embedded digits only smoke-test the shapes):
    mmjax train --config configs/clip_vit_b32.py --workdir gs://bucket/clip_b32

Smoke test of the wiring on one CPU (tiny batch, two steps):
    mmjax train --config configs/clip_vit_b32.py --workdir /tmp/b32 \
        --config.train.batch_size=8 --config.train.steps=2 --config.optim.warmup_steps=1 \
        --config.model.dtype=float32 --config.eval.zeroshot=False
"""

import math

from mmjax.config import base_config


def get_config(arg=None):
    c = base_config()
    c.model.embed_dim = 512
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.remat = "dots"
    c.model.scan_layers = True
    c.model.loss = "softmax"
    c.model.logit_scale_init = math.log(1 / 0.07)
    c.model.image.update(image_size=224, patch_size=32, channels=3, width=768, depth=12, num_heads=12,
                         mlp_dim=3072, pool="cls")
    c.model.text.update(vocab_size=49408, max_len=77, width=512, depth=12, num_heads=8, mlp_dim=2048,
                        causal=True, pool="eot", tokenizer="bytes")
    c.data.image_mean = (0.48145466, 0.4578275, 0.40821073)
    c.data.image_std = (0.26862954, 0.26130258, 0.27577711)

    c.optim.lr = 5e-4
    c.optim.warmup_steps = 10_000
    c.optim.decay = "cosine"
    c.optim.weight_decay = 0.2
    c.optim.b2 = 0.98

    c.train.steps = 100_000
    c.train.batch_size = 32_768
    c.train.log_every = 100
    c.checkpoint.every_steps = 2_000
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    return c
