r"""Real-shape CLIP / SigLIP for accelerators, one config parameterised by the model variant.

`arg` (what follows the `:` in `--config configs/clip.py:ARG`) is, as in big_vision's `parse_arg`, a
comma-separated list: the model variant first, then optional `key=value` pairs. The only key is
`loss` (`softmax`, the default: CLIP InfoNCE; `sigmoid`: the SigLIP recipe). Valid variants:

    B/32                 CLIP ViT-B/32   (was configs/clip_vit_b32.py)
    B/16                 CLIP ViT-B/16   (was configs/clip_vit_b16.py; the default when no arg is given)
    L/14                 CLIP ViT-L/14   (was configs/clip_vit_l14.py)
    B/16,loss=sigmoid    SigLIP ViT-B/16 (was configs/siglip_b16.py)

Anything else raises ValueError naming these. The old file names remain as thin aliases of the variants.
Every variant: bf16 compute with f32 parameters, scanned layers with remat 'dots', 100k steps at a global
batch of 32,768, logs every 100 steps, a checkpoint every 2,000. The embedded digits data only smoke-test
the shapes: point data.* at a real corpus (README.md, "Data").

B/16 -- CLIP ViT-B/16 (the OpenAI / open_clip shape): 150M parameters.
  Shape: image 224x224, patch 16, width 768, 12 layers, 12 heads; text 77 tokens, width 512, 12 layers,
  8 heads; joint embedding 512; InfoNCE with learned temperature; AdamW lr 5e-4, wd 0.2, b2 0.98,
  10k warmup steps, cosine decay; global batch 32,768 as in the CLIP paper. Mesh: data=-1 (pure data
  parallel).
  Run (a TPU/GPU pod):
    mmjax train --config configs/clip.py:B/16 --workdir gs://bucket/clip_b16 \
        --config.mesh.data=-1 --config.mesh.fsdp=8
  Smoke test of the wiring on one CPU (tiny batch, a few steps, expect a loss near log(8) = 2.08):
    mmjax train --config configs/clip.py:B/16 --workdir /tmp/b16 \
        --config.train.batch_size=8 --config.train.steps=2 --config.optim.warmup_steps=1 \
        --config.model.dtype=float32 --config.eval.zeroshot=False

B/32 -- CLIP ViT-B/32 (the OpenAI / open_clip shape): 151M parameters.
  Shape: image 224x224, patch 32 (50 tokens), width 768, 12 layers, 12 heads, MLP 3072; text 77 tokens,
  width 512, 12 layers, 8 heads; joint embedding 512; InfoNCE with learned temperature; AdamW lr 5e-4,
  wd 0.2, b2 0.98, 10k warmup steps, cosine decay; global batch 32,768 as in the CLIP paper.
  Meshes (the model is small: data parallelism with the weights and optimizer state sharded by fsdp;
  the default is data=1, fsdp=-1; check one ahead of time with `mmjax compile`, needs
  `pip install -e '.[tpu]'`):
    v4-128   (64 chips, 32 GiB):  --config.mesh.data=1 --config.mesh.fsdp=-1            (fsdp=64)
    v5e-256  (256 chips, 16 GiB): --config.mesh.data=1 --config.mesh.fsdp=-1            (fsdp=256)
    v5p-256  (128 chips, 95 GiB): --config.mesh.data=-1                                 (data=128)
    v6e-256  (256 chips, 32 GiB): --config.mesh.data=1 --config.mesh.fsdp=-1            (fsdp=256)
  e.g. mmjax compile --config configs/clip.py:B/32 --topology v5e-256 --json b32_v5e256.json
  Run (a TPU pod; see launch/README.md):
    mmjax train --config configs/clip.py:B/32 --workdir gs://bucket/clip_b32
  Smoke test of the wiring on one CPU (tiny batch, two steps, about a minute; expect a loss near
  log(8) = 2.08):
    mmjax train --config configs/clip.py:B/32 --workdir /tmp/b32 \
        --config.train.batch_size=8 --config.train.steps=2 --config.optim.warmup_steps=1 \
        --config.model.dtype=float32 --config.eval.zeroshot=False

L/14 -- CLIP ViT-L/14 (the OpenAI / open_clip shape): 428M parameters.
  Shape: image 224x224, patch 14 (257 tokens), width 1024, 24 layers, 16 heads, MLP 4096; text 77
  tokens, width 768, 12 layers, 12 heads; joint embedding 768; InfoNCE with learned temperature; AdamW
  lr 4e-4, wd 0.2, b2 0.98, 10k warmup steps, cosine decay; global batch 32,768; scanned layers with
  remat 'dots'. Default mesh data=1, fsdp=-1.
  Meshes (check one ahead of time on this CPU host with `mmjax compile`, needs `pip install -e '.[tpu]'`):
    v5p-256  (128 chips, 95 GiB): --config.mesh.data=1 --config.mesh.fsdp=-1            (fsdp=128)
    v6e-256  (256 chips, 32 GiB): --config.mesh.data=1 --config.mesh.fsdp=-1            (fsdp=256)
    2 x v5p-256 over DCN:         --num-slices=2 --config.mesh.data=2 --config.mesh.fsdp=-1
  e.g. mmjax compile --config configs/clip.py:L/14 --topology v5p-256 \
           --config.mesh.data=1 --config.mesh.fsdp=-1 --json l14_v5p256.json
  Run (a TPU pod; see launch/README.md):
    mmjax train --config configs/clip.py:L/14 --workdir gs://bucket/clip_l14 \
        --config.mesh.data=1 --config.mesh.fsdp=-1

B/16,loss=sigmoid -- SigLIP ViT-B/16 (the big_vision shape): ~200M parameters.
  Shape: image 224x224, patch 16 (196 tokens), width 768, 12 layers, 12 heads, MLP 3072, mean-pooled
  (SigLIP's MAP head is approximated by mean pooling); text 64 tokens, bidirectional, vocabulary 32,000,
  width 768, 12 layers, 12 heads, pooled at the last token (EOT); joint embedding 768; image mean/std
  0.5. Loss: pairwise sigmoid with a learned temperature initialised to 10 (stored as log 10) and a
  learned bias initialised to -10. AdamW lr 1e-3, wd 1e-4, b2 0.95, 5k warmup, cosine; global batch
  32,768. Default mesh data=1, fsdp=-1.
  Meshes (check one ahead of time with `mmjax compile`, needs `pip install -e '.[tpu]'`):
    v5e-256  (256 chips, 16 GiB): --config.mesh.data=1 --config.mesh.fsdp=-1            (fsdp=256)
    v5p-256  (128 chips, 95 GiB): --config.mesh.data=1 --config.mesh.fsdp=-1            (fsdp=128)
    v6e-256  (256 chips, 32 GiB): --config.mesh.data=1 --config.mesh.fsdp=-1            (fsdp=256)
    v6e-256 with 2-way tensor:    --config.mesh.data=1 --config.mesh.fsdp=-1 --config.mesh.tensor=2
  e.g. mmjax compile --config configs/clip.py:B/16,loss=sigmoid --topology v6e-256 --json siglip_v6e256.json
  Run (a TPU pod; see launch/README.md):
    mmjax train --config configs/clip.py:B/16,loss=sigmoid --workdir gs://bucket/siglip_b16
  Smoke test of the wiring on one CPU (tiny batch, two steps; expect a loss near 10: with the bias at -10
  each positive pair costs about 10 and the negatives almost nothing):
    mmjax train --config configs/clip.py:B/16,loss=sigmoid --workdir /tmp/siglip_b16 \
        --config.train.batch_size=8 --config.train.steps=2 --config.optim.warmup_steps=1 \
        --config.model.dtype=float32 --config.eval.zeroshot=False
"""

import math

from mmjax.config import base_config

# (model variant, loss) -> the variant's settings; the keys are exactly the valid args.
_IMAGE = dict(image_size=224, channels=3)
_CLIP_TEXT = dict(vocab_size=49408, max_len=77, causal=True, pool="eot", tokenizer="bytes")
_CLIP_MEAN_STD = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))

VARIANTS = {
    ("B/32", "softmax"): dict(
        embed_dim=512,
        image=dict(patch_size=32, width=768, depth=12, num_heads=12, mlp_dim=3072, pool="cls"),
        text=dict(_CLIP_TEXT, width=512, depth=12, num_heads=8, mlp_dim=2048),
        lr=5e-4, mesh=dict(data=1, fsdp=-1, tensor=1)),
    ("B/16", "softmax"): dict(
        embed_dim=512,
        image=dict(patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072, pool="cls"),
        text=dict(_CLIP_TEXT, width=512, depth=12, num_heads=8, mlp_dim=2048),
        lr=5e-4, mesh=dict(data=-1, fsdp=1, tensor=1)),
    ("L/14", "softmax"): dict(
        embed_dim=768,
        image=dict(patch_size=14, width=1024, depth=24, num_heads=16, mlp_dim=4096, pool="cls"),
        text=dict(_CLIP_TEXT, width=768, depth=12, num_heads=12, mlp_dim=3072),
        lr=4e-4, mesh=dict(data=1, fsdp=-1, tensor=1)),
    ("B/16", "sigmoid"): dict(
        embed_dim=768,
        image=dict(patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072, pool="mean"),
        text=dict(vocab_size=32_000, max_len=64, width=768, depth=12, num_heads=12, mlp_dim=3072,
                  causal=False, pool="eot", tokenizer="bytes"),
        lr=1e-3, mesh=dict(data=1, fsdp=-1, tensor=1)),
}


def _spell(variant, loss):
    return variant if loss == "softmax" else f"{variant},loss={loss}"


VALID = tuple(_spell(v, l) for v, l in VARIANTS)  # ('B/32', 'B/16', 'L/14', 'B/16,loss=sigmoid')


def parse_arg(arg):
    """'B/16' | 'B/16,loss=sigmoid' -> ('B/16', 'sigmoid'). Raises ValueError naming the valid variants."""
    arg = "B/16" if arg is None or not str(arg).strip() else str(arg)
    variant, loss, problems = None, "softmax", []
    for i, item in enumerate(p.strip() for p in arg.split(",")):
        if "=" in item:
            key, value = (s.strip() for s in item.split("=", 1))
            if key == "loss":
                loss = value
            else:
                problems.append(f"unknown key {key!r} (known: loss)")
        elif i == 0:
            variant = item
        else:
            problems.append(f"{item!r} is not key=value")
    if variant is not None:
        variant = variant.upper()
    if problems or (variant, loss) not in VARIANTS:
        detail = f" ({'; '.join(problems)})" if problems else ""
        raise ValueError(f"configs/clip.py: unknown variant {arg!r}{detail}; valid variants: "
                         f"{', '.join(VALID)} (e.g. --config configs/clip.py:B/16)")
    return variant, loss


def get_config(arg="B/16"):
    variant, loss = parse_arg(arg)
    v = VARIANTS[variant, loss]
    sigmoid = loss == "sigmoid"

    c = base_config()
    c.model.embed_dim = v["embed_dim"]
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.remat = "dots"
    c.model.scan_layers = True
    c.model.loss = loss
    if sigmoid:  # SigLIP: t' = log 10, b = -10
        c.model.logit_scale_init = math.log(10.0)
        c.model.logit_bias_init = -10.0
    else:  # CLIP: temperature 0.07
        c.model.logit_scale_init = math.log(1 / 0.07)
    c.model.image.update(**_IMAGE, **v["image"])
    c.model.text.update(**v["text"])
    if sigmoid:
        c.data.image_mean, c.data.image_std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    else:
        c.data.image_mean, c.data.image_std = _CLIP_MEAN_STD

    c.optim.lr = v["lr"]
    c.optim.warmup_steps = 5_000 if sigmoid else 10_000
    c.optim.decay = "cosine"
    c.optim.weight_decay = 1e-4 if sigmoid else 0.2
    c.optim.b2 = 0.95 if sigmoid else 0.98

    c.train.steps = 100_000
    c.train.batch_size = 32_768
    c.train.log_every = 100
    c.checkpoint.every_steps = 2_000
    c.mesh.update(**v["mesh"])
    return c
