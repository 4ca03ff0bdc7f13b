"""BEiT-3 as a fusion encoder: `MultiwayClassifier`, the image-text classifier of task 'classification' with
`model.fusion.backbone='multiway'`.

    image [B,H,W,C], text int32 [B,L] -> MultiwayModel.fuse (the vision-language path: [image CLS, patches; text],
    the vision / language experts below the top `vl_layers` blocks, the vision-language expert in them, the
    shared final LN) -> concat(image CLS token, text BOS token) [B, 2*width] -> ClassifierHead ('head': LN,
    Dense(hidden), GELU, Dense(num_classes)) -> logits float32 [B, num_classes]

Its stack is `MultiwayModel`'s under the same parameter names ('patch_embed', 'image_cls', 'image_pos', 'text',
'multiway', 'ln_final'), so `init_from` with a task 'mdm' workdir loads every one of them by name; 'head' is new.
It has none of the pretraining parameters the vision-language path does not read (the masked-image token
'mask_token', the 'mim_head' / 'mlm_head', the dual encoder's projections and 'logit_scale', the image tokenizer
'encoder' / 'quantizer', and the vision and language experts of the top `vl_layers` blocks, which only the
monomodal paths route to): init_from reports those as ignored.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from mmjax.models.fusion_model import ClassifierHead
from mmjax.models.layers import ACT_POOLED, constrain
from mmjax.models.multiway import MultiwayModel, stack_fields


class MultiwayClassifier(MultiwayModel):
    """`MultiwayModel`'s embeddings, stack and final LN, with a classifier head on the vision-language path (module
    docstring). Of `MultiwayModel`'s methods it serves `embed_image` (without `image_mask`), `vision`, `language`
    and `fuse`; the pretraining heads and the tokenizer are not part of it. `embed_dim` and `vq` are unused."""
    dual_encoder: ClassVar[bool] = False  # no embeddings of its own: `mmjax eval` runs the task's evaluation
    embed_dim: int = 0
    vq: tuple[tuple[str, Any], ...] = ()
    num_classes: int = 2
    hidden: int = 128

    def setup(self):
        kw = self.setup_stack(mask_token=False)  # MultiwayModel's names: what init_from matches a checkpoint by
        self.head = ClassifierHead(self.hidden, self.num_classes, **kw)

    def pooled(self, images: jax.Array, tokens: jax.Array) -> jax.Array:
        """images [B,H,W,C], tokens int32 [B,L] -> [B, 2*width]: the fused sequence's image CLS token and text BOS
        token (position 0 of each part of `fuse`), concatenated."""
        image, text = self.fuse(images, tokens)
        return constrain(jnp.concatenate([image[:, 0], text[:, 0]], axis=-1), ACT_POOLED)

    def __call__(self, batch: dict[str, jax.Array], train: bool = False) -> jax.Array:
        """batch {'image': float [B,H,W,C], 'text': int32 [B,L] (pad 0)} -> logits float32 [B, num_classes].
        `train` is accepted for the task's call contract (no dropout)."""
        del train
        return self.head(self.pooled(batch['image'], batch['text']))


def build_multiway_classifier(model_cfg) -> MultiwayClassifier:
    """`config.model` -> MultiwayClassifier: the stack as `MultiwayModel`'s (`multiway.stack_fields`), the head
    from `model.fusion` (num_classes, hidden)."""
    f = model_cfg.fusion
    return MultiwayClassifier(**stack_fields(model_cfg), num_classes=int(f.num_classes), hidden=int(f.hidden))
