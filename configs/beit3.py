"""BEiT-3 shapes for task 'mdm' (masked data modelling on a multiway transformer), for `mmjax compile` on v5p-64.

    mmjax compile --config configs/beit3.py:base --topology v5p-64 --config.mesh.fsdp=8
    mmjax compile --config configs/beit3.py:large --topology v5p-64 --config.mesh.fsdp=32

'base': 12 blocks of width 768 (12 heads, MLP 3072); 'large': 24 blocks of width 1024 (16 heads, MLP 4096); both
with the vision-language experts in the top 3 blocks, as in BEiT-3. Images 224 px in 16 px patches (14 x 14), masked
blockwise (40 %) and predicted as the codes of an 8,192-code VQ image tokenizer of the same 14 x 14 grid; text: 64
tokens over a 64,010-row vocabulary (BEiT-3's SentencePiece size; the bytes tokenizer stands in, so it runs as
given on the digits' data). The tokenizer's weights come from a task 'vq' workdir (image_tokenizer.workdir).
bfloat16 compute, float32 parameters, full remat. Per-chip memory: docs/generative.md, "Real shapes".
"""

from mmjax.config import base_config

SHAPES = {  # width, depth, heads, MLP
    "base": (768, 12, 12, 3072),
    "large": (1024, 24, 16, 4096),
}


def get_config(arg=None):
    arg = arg or "base"
    if arg not in SHAPES:
        raise ValueError(f"configs/beit3.py:{arg}: choose one of {sorted(SHAPES)}")
    width, depth, heads, mlp = SHAPES[arg]
    c = base_config()
    c.task = "mdm"
    c.data.name = "digits"
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.model.embed_dim = width
    c.model.image.update(image_size=224, patch_size=16, channels=3)
    c.model.text.update(vocab_size=64010, max_len=64, tokenizer="bytes")
    # 224 px -> 14 x 14 codes: four 2x downsamplings (five widths).
    c.model.vq.update(widths=(128, 128, 256, 256, 512), res_blocks=2, code_dim=32, codebook_size=8192)
    c.model.mdm.update(width=width, depth=depth, num_heads=heads, mlp_dim=mlp, vl_layers=3, image_mask_ratio=0.4,
                       min_block_patches=16, text_mask_ratio=0.15, pair_text_mask_ratio=0.5)
    c.optim.lr = 1e-3 if arg == "base" else 5e-4
    c.optim.warmup_steps = 10_000
    c.optim.decay = "cosine"
    c.optim.weight_decay = 0.05
    c.train.steps = 1_000_000
    # BEiT-3's 6,144 fits 'base' on v5p-64 (23 GiB per chip) but not 'large' (97.3 of 95 GiB): 2,048 for 'large'.
    c.train.batch_size = 6144 if arg == "base" else 2048
    c.eval.zeroshot = False
    return c
