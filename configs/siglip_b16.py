"""SigLIP ViT-B/16 (the big_vision shape) for accelerators: ~200M parameters, bf16 compute.

Shape: image 224x224, patch 16 (196 tokens), width 768, 12 layers, 12 heads, MLP 3072, mean-pooled
(SigLIP's MAP head is approximated by mean pooling); text 64 tokens, bidirectional, vocabulary 32,000,
width 768, 12 layers, 12 heads, pooled at the last token (EOT); joint embedding 768.
Loss: pairwise sigmoid with a learned temperature initialised to 10 (stored as log 10) and a learned
bias initialised to -10. AdamW lr 1e-3, wd 1e-4, b2 0.95, 5k warmup, cosine; global batch 32,768.

Meshes (check one ahead of time with `mmjax compile`, needs `pip install -e '.[tpu]'`):
    v5e-256  (256 chips, 16 GiB): --config.mesh.data=1 --config.mesh.fsdp=-1            (fsdp=256)
    v5p-256  (128 chips, 95 GiB): --config.mesh.data=1 --config.mesh.fsdp=-1            (fsdp=128)
    v6e-256  (256 chips, 32 GiB): --config.mesh.data=1 --config.mesh.fsdp=-1            (fsdp=256)
    v6e-256 with 2-way tensor:    --config.mesh.data=1 --config.mesh.fsdp=-1 --config.mesh.tensor=2
  e.g. mmjax compile --config configs/siglip_b16.py --topology v6e-256 --json siglip_v6e256.json

Run (a TPU pod; see launch/README.md; the embedded digits only smoke-test the shapes):
    mmjax train --config configs/siglip_b16.py --workdir gs://bucket/siglip_b16
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
    c.model.loss = "sigmoid"
    c.model.logit_scale_init = math.log(10.0)
    c.model.logit_bias_init = -10.0
    c.model.image.update(image_size=224, patch_size=16, channels=3, width=768, depth=12, num_heads=12,
                         mlp_dim=3072, pool="mean")
    c.model.text.update(vocab_size=32_000, max_len=64, width=768, depth=12, num_heads=12, mlp_dim=3072,
                        causal=False, pool="eot", tokenizer="bytes")
    c.data.image_mean = (0.5, 0.5, 0.5)
    c.data.image_std = (0.5, 0.5, 0.5)

    c.optim.lr = 1e-3
    c.optim.warmup_steps = 5_000
    c.optim.decay = "cosine"
    c.optim.weight_decay = 1e-4
    c.optim.b2 = 0.95

    c.train.steps = 100_000
    c.train.batch_size = 32_768
    c.train.log_every = 100
    c.checkpoint.every_steps = 2_000
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    return c
