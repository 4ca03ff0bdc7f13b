"""CoCa at real shapes (task 'coca'), for `mmjax compile` / `mmjax bench` and pods.

    mmjax compile --config configs/coca.py:L/14 --topology v5p-128 --config.mesh.fsdp=16

'L/14' is open_clip's coca_ViT-L-14 exactly (what `mmjax convert open_clip --model-config coca_ViT-L-14` writes):
ViT-L/14 at 224 px (24 layers, width 1024), an attentional pooler of 256 queries (1 contrastive + 255 captioning,
8 heads, width 768), 12 unimodal text layers of width 768 (12 heads, 76 tokens + CLS), and open_clip's 12
multimodal layers as 24 mmjax blocks (a causal block, then a cross-attention block: cross_attention_every=2),
embed_dim 768, CLIP BPE (49408 ids + pad). 'B/32' is coca_ViT-B-32.
"""

from mmjax.config import base_config

SHAPES = {
    # image (size, patch, width, depth), text (width, depth, heads), embed_dim, pooler heads
    "L/14": ((224, 14, 1024, 24), (768, 12, 12), 768, 8),
    "B/32": ((224, 32, 768, 12), (512, 12, 8), 512, 8),
}


def get_config(arg=None):
    arg = arg or "L/14"
    if arg not in SHAPES:
        raise ValueError(f"configs/coca.py:{arg}: choose one of {sorted(SHAPES)}")
    (size, patch, v_width, v_depth), (t_width, t_depth, t_heads), embed, pool_heads = SHAPES[arg]
    c = base_config()
    c.task = "coca"
    c.model.embed_dim = embed
    c.model.dtype = "bfloat16"
    c.model.remat = "full"  # "dots" needs 132 GiB per v5p chip at batch 32,768 on v5p-128; "full" 24.4 GiB
    c.model.image.update(image_size=size, patch_size=patch, channels=3, width=v_width, depth=v_depth,
                         num_heads=v_width // 64, mlp_dim=4 * v_width, pool="cls")
    c.model.text.update(vocab_size=49409, max_len=76, width=t_width, depth=t_depth, num_heads=t_heads,
                        mlp_dim=4 * t_width, causal=True, pool="eot", tokenizer="bytes")  # shapes only; train with tokenizer='clip_bpe' + tokenizer_path
    c.model.coca.update(caption_queries=255, pooler_width=embed, pooler_heads=pool_heads, decoder_depth=2 * t_depth,
                        decoder_heads=t_heads, decoder_mlp_dim=4 * t_width, cross_attention_every=2,
                        captioning_weight=2.0, eval_beam=4)
    c.data.image_mean = (0.48145466, 0.4578275, 0.40821073)
    c.data.image_std = (0.26862954, 0.26130258, 0.27577711)
    c.eval.zeroshot = False
    c.optim.lr = 5e-4
    c.optim.warmup_steps = 2000
    c.train.steps = 500_000
    c.train.batch_size = 32768
    return c
