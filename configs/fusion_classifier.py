"""Fusion classifier: does this caption describe this image? (task 'classification', 2 CPU cores).

Image-caption pairs from the embedded digits (mmjax/data/pairs.py): half the captions name the image's digit
(label 1), half another digit (label 0). ViT + text transformer -> co-attention -> fusion
(model.fusion.mode: concat | weighted | gated | xattn) -> MLP head, trained with softmax CE plus
`model.fusion.contrastive_weight` x a CLIP loss between the two towers' own pooled features (projection heads
'image/head', 'text/head', over the matching pairs of the batch only), in one step.

Why the auxiliary loss: with CE alone the match/no-match signal only reaches the towers once both already tell
digits apart, so from random initialisation every fusion mode sat at the prior (held-out 0.547, loss 0.69) for
the whole budget. The contrastive term teaches both towers the digit identity directly; the CE then drops off
its plateau after ~200 steps.

Run:
    mmjax train --config configs/fusion_classifier.py --workdir /tmp/mmjax_fusion
    mmjax train --config configs/fusion_classifier.py --workdir /tmp/mmjax_fusion_gated \\
        --config.model.fusion.mode=gated

Expected: held-out `classify/accuracy` >= 0.95 (pairs from the 360 test images, index % 5 == 0, fixed seed),
written to <workdir>/metrics.jsonl. Measured 2026-11-28, 600 steps, concat: 0.967 in 4 min 41 s wall
(281 s; 439 CPU-s) on 2 CPU cores with no other training job running. Other modes: README table. With CE alone (contrastive_weight=0.0) the loss was still 0.69
(chance) after 400 steps.
"""

from mmjax.config import base_config


def get_config(arg=None):
    c = base_config()
    c.seed = 0
    c.task = "classification"
    c.data.name = "digits"

    c.model.image.update(image_size=32, patch_size=8, channels=3, width=64, depth=2, num_heads=4,
                         mlp_dim=128, pool="cls")
    c.model.text.update(vocab_size=384, max_len=40, width=64, depth=2, num_heads=4, mlp_dim=128,
                        causal=True, pool="eot", tokenizer="bytes")
    c.model.fusion.update(mode="concat", num_layers=1, num_heads=4, mlp_dim=128, hidden=64,
                          num_classes=2, proj_dim=None, per_feature=True, contrastive_weight=1.0)

    c.optim.lr = 2e-3
    c.optim.warmup_steps = 50
    c.optim.decay = "cosine"
    c.optim.weight_decay = 0.05

    c.train.steps = 600
    c.train.batch_size = 128
    c.train.log_every = 50
    c.checkpoint.every_steps = 300
    c.eval.zeroshot = False
    return c
