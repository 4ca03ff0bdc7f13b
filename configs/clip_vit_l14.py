"""CLIP ViT-L/14 (the OpenAI / open_clip shape) for accelerators: 428M parameters, bf16 compute.

Shape: image 224x224, patch 14 (257 tokens), width 1024, 24 layers, 16 heads, MLP 4096; text 77 tokens,
width 768, 12 layers, 12 heads; joint embedding 768; InfoNCE with learned temperature; AdamW lr 4e-4,
wd 0.2, b2 0.98, 10k warmup steps, cosine decay; global batch 32,768; scanned layers with remat 'dots'.

Meshes (check one ahead of time on this CPU host with `mmjax compile`, needs `pip install -e '.[tpu]'`):
    v5p-256  (128 chips, 95 GiB): --config.mesh.data=1 --config.mesh.fsdp=-1            (fsdp=128)
    v6e-256  (256 chips, 32 GiB): --config.mesh.data=1 --config.mesh.fsdp=-1            (fsdp=256)
    2 x v5p-256 over DCN:         --num-slices=2 --config.mesh.data=2 --config.mesh.fsdp=-1
  e.g. mmjax compile --config configs/clip_vit_l14.py --topology v5p-256 \
           --config.mesh.data=1 --config.mesh.fsdp=-1 --json l14_v5p256.json

Run (a TPU pod; see launch/README.md; the embedded digits only smoke-test the shapes):
    mmjax train --config configs/clip_vit_l14.py --workdir gs://bucket/clip_l14 \
        --config.mesh.data=1 --config.mesh.fsdp=-1
"""

import math

from mmjax.config import base_config


def get_config(arg=None):
    c = base_config()
    c.model.embed_dim = 768
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.remat = "dots"
    c.model.scan_layers = True
    c.model.loss = "softmax"
    c.model.logit_scale_init = math.log(1 / 0.07)
    c.model.image.update(image_size=224, patch_size=14, channels=3, width=1024, depth=24, num_heads=16,
                         mlp_dim=4096, pool="cls")
    c.model.text.update(vocab_size=49408, max_len=77, width=768, depth=12, num_heads=12, mlp_dim=3072,
                        causal=True, pool="eot", tokenizer="bytes")
    c.data.image_mean = (0.48145466, 0.4578275, 0.40821073)
    c.data.image_std = (0.26862954, 0.26130258, 0.27577711)

    c.optim.lr = 4e-4
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
