"""Task 'classification': does this caption describe this image? A classifier trained on image-caption matching
pairs of the labelled digits, on one of two backbones (`model.fusion.backbone`):
  - 'towers': a FusionClassifier (ViT and text towers, co-attention layers, a fusion module, an MLP head);
  - 'multiway': BEiT-3's multiway stack as the fusion encoder (`mmjax.models.multiway_classifier`, shapes from
    model.mdm), whose parameters `init_from` loads from a task 'mdm' workdir; full fine-tuning only
    (finetune.mode='none'; `optim.freeze_rules` may freeze the stack for a head-only fine-tune).

Objective: softmax cross-entropy on the pair's label, plus (towers only) `model.fusion.contrastive_weight` × the
CLIP loss on the towers' embeddings of the matching pairs. Evaluation: held-out pair accuracy ('classify/accuracy').
"""

from __future__ import annotations

import flax.linen as nn
from jax.sharding import Mesh

from mmjax.config import FUSION_BACKBONES, FUSION_MODES
from mmjax.eval.pairs import classification_eval
from mmjax.losses import fusion as objectives
from mmjax.models import build_fusion_classifier
from mmjax.models.multiway_classifier import build_multiway_classifier
from mmjax.tasks.base import Task, image_text_only_problems
from mmjax.tasks.mdm import fused_forward_flops, multiway_shape_problems


def classification_objective(contrastive_weight: float):
    """softmax CE of the FusionClassifier on batch['label'] ('loss', 'accuracy'), plus `contrastive_weight` *
    CLIP loss over the matching pairs (objectives.classification_contrastive_loss) when it is > 0."""

    def classify(model, params, batch, step):
        del step
        inputs = {k: batch[k] for k in ("image", "text")}
        if contrastive_weight > 0:  # CE + weight * contrastive on the matching pairs' tower embeddings
            outputs = model.apply({"params": params}, inputs, train=True, with_embeddings=True)
            return objectives.classification_contrastive_loss(outputs, batch["label"], contrastive_weight)
        logits = model.apply({"params": params}, inputs, train=True)
        return objectives.classification_loss(logits, batch["label"])

    return classify


class ClassificationTask(Task):
    name = "classification"
    examples = "pairs"

    def inputs(self, config) -> tuple[str, ...]:
        return ("image", "text", "label")

    def build_model(self, model_config) -> nn.Module:
        if backbone_of(model_config) == "multiway":
            return build_multiway_classifier(model_config)
        return build_fusion_classifier(model_config)

    def objective(self, config, mesh: Mesh):
        return classification_objective(float(config.model.fusion.get("contrastive_weight", 0.0) or 0.0))

    def evaluate(self, config, model, params, mesh, rules, cache):
        return classification_eval(config, model, params, mesh, rules)

    def config_problems(self, config) -> list[str]:
        backbone = backbone_of(config.model)
        if backbone == "multiway":
            problems = image_text_only_problems(config, self.name, finetune_mode=False) + _multiway_problems(config)
        elif backbone == "towers":
            problems = image_text_only_problems(config, self.name) + _fusion_problems(config.model)
        else:
            problems = [f"model.fusion.backbone={backbone!r}: choose one of {FUSION_BACKBONES}"]
        if config.data.name != "digits":
            problems.append(f"data.name={config.data.name!r}: task 'classification' needs the labelled digits "
                            f"(data.name='digits')")
        return problems

    def flops_per_example(self, config) -> float:
        if backbone_of(config.model) == "multiway":
            return multiway_flops_per_example(config)
        return super().flops_per_example(config)


def backbone_of(model_config) -> str:
    """`model.fusion.backbone`: 'towers' (FusionClassifier) or 'multiway' (MultiwayClassifier)."""
    return str(model_config.fusion.get("backbone", "towers"))


def multiway_flops_per_example(config) -> float:
    """Model FLOPs of one training example of the multiway classifier: 3 x the forward of the vision-language path
    (`mdm.fused_forward_flops`) and the head."""
    f, w = config.model.fusion, int(config.model.mdm.width)
    return 3.0 * (fused_forward_flops(config) + 2.0 * int(f.hidden) * (2 * w + int(f.num_classes)))


def _num_classes_problems(f) -> list[str]:
    if f.num_classes <= 0:
        return [f"model.fusion.num_classes must be positive, got {f.num_classes}"]
    if f.num_classes < 2:
        return [f"model.fusion.num_classes={f.num_classes}: the image-caption pairs have labels 0/1; use >= 2"]
    return []


def _multiway_problems(config) -> list[str]:
    """model.fusion.backbone='multiway': the head's keys, what the backbone does not have, the stack's shapes."""
    f, problems = config.model.fusion, _num_classes_problems(config.model.fusion)
    if f.hidden < 1:
        problems.append(f"model.fusion.hidden must be positive, got {f.hidden}")
    if f.contrastive_weight != 0:
        problems.append(f"model.fusion.contrastive_weight={f.contrastive_weight}: the multiway backbone has no "
                        f"contrastive towers in task 'classification'; set it to 0 (BEiT-3's contrastive fine-tuning "
                        f"is task 'mdm' with model.mdm.contrastive_weight)")
    if f.mode != "concat":
        problems.append(f"model.fusion.mode={f.mode!r}: the multiway backbone fuses in its vision-language blocks and "
                        f"classifies their image CLS and text BOS tokens concatenated; use model.fusion.mode='concat'")
    if config.finetune.mode != "none":
        problems.append(f"finetune.mode={config.finetune.mode!r}: the multiway backbone supports full fine-tuning "
                        f"only (finetune.mode='none'; freeze the stack with optim.freeze_rules for a head-only "
                        f"fine-tune): MultiwayBlock has no adapter / LoRA / prompt fields (adapter_dim, lora_rank, "
                        f"num_prompts live on EncoderOptions / EncoderBlock of the towers)")
    return problems + multiway_shape_problems(config)


def _fusion_problems(m) -> list[str]:
    f = m.fusion
    problems = [f"model.fusion.mode: {f.mode!r}; choose one of {FUSION_MODES}"] if f.mode not in FUSION_MODES else []
    problems += _num_classes_problems(f)
    for key in ("num_layers", "hidden", "mlp_dim", "num_heads"):
        if f[key] < (0 if key == "num_layers" else 1):
            problems.append(f"model.fusion.{key} must be positive, got {f[key]}")
    if f.num_heads >= 1:
        for tower in ("image", "text"):
            if m[tower].width % f.num_heads:
                problems.append(f"model.{tower}.width={m[tower].width} is not divisible by "
                                f"model.fusion.num_heads={f.num_heads}")
    if f.contrastive_weight < 0:
        problems.append(f"model.fusion.contrastive_weight must be >= 0, got {f.contrastive_weight}")
    if f.proj_dim is not None and f.proj_dim <= 0:
        problems.append(f"model.fusion.proj_dim must be positive or None, got {f.proj_dim}")
    if (f.mode in ("concat", "weighted", "gated") and f.proj_dim is None
            and m.image.width != m.text.width):
        problems.append(f"model.fusion.mode={f.mode!r} fuses pooled features of mismatched widths "
                        f"model.text.width={m.text.width} and model.image.width={m.image.width}; set "
                        f"model.fusion.proj_dim to project both to one width (or make the widths equal)")
    return problems


