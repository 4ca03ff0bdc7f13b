"""A Flamingo-like model at real shapes (task 'flamingo', stage 'flamingo'), for `mmjax compile` on v5p-256.

    mmjax compile --config configs/flamingo.py --topology v5p-256 --config.mesh.data=1 --config.mesh.fsdp=-1 \
        --config.mesh.tensor=4

Vision: ViT-L/14 at 224 px (frozen). Resampler: 64 latents x 6 layers (width 1024, 16 heads). LM: a 7B-shaped
decoder (width 4096, 32 layers, 32 heads, MLP 11008, 32,000 ids + <image>, <|endofchunk|>), frozen, with a
tanh-gated cross-attention in every 4th block (8 blocks). Sequences: 5 images, 512 tokens. bfloat16 compute,
float32 parameters, full remat; on a pod shard the parameters over fsdp (all chips but tensor=4), as above.
Compiled for v5p-256 by the command above: 11.43 GiB per chip for the train step, 1.88 GiB for a sampler of
1,280 images (docs/generative.md, "Real shapes").
"""

from mmjax.config import base_config
from mmjax.config.defaults import FLAMINGO_FREEZE_RULES


def get_config(arg=None):
    c = base_config()
    c.task = "flamingo"
    c.model.dtype, c.model.remat = "bfloat16", "full"
    c.model.image.update(image_size=224, patch_size=14, channels=3, width=1024, depth=24, num_heads=16,
                         mlp_dim=4096, pool="mean")
    c.model.text.update(vocab_size=32128, max_len=512, width=4096, depth=32, num_heads=32, mlp_dim=11008,
                        tokenizer="bytes")
    c.model.flamingo.update(stage="flamingo", num_latents=64, resampler_depth=6, resampler_heads=16,
                            resampler_mlp_dim=4096, cross_attention_every=4, max_images=5)
    c.optim.freeze_rules = FLAMINGO_FREEZE_RULES
    c.optim.lr = 1e-4
    c.train.batch_size = 5 * 1024  # images: 1,024 sequences of 5
    c.eval.zeroshot = False
    return c
