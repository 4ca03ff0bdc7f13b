"""Task 'classification': does this caption describe this image? A FusionClassifier (co-attention layers, a
fusion module, an MLP head) trained on image-caption matching pairs of the labelled digits.

Objective: softmax cross-entropy on the pair's label, plus `model.fusion.contrastive_weight` × the CLIP loss on
the towers' embeddings of the matching pairs. Evaluation: held-out pair accuracy ('classify/accuracy').
"""

from __future__ import annotations

import flax.linen as nn
from jax.sharding import Mesh

from mmjax.config import FUSION_MODES
from mmjax.eval.pairs import classification_eval
from mmjax.losses import fusion as objectives
from mmjax.models import build_fusion_classifier
from mmjax.tasks.base import Task, image_text_only_problems


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
        return build_fusion_classifier(model_config)

    def objective(self, config, mesh: Mesh):
        return classification_objective(float(config.model.fusion.get("contrastive_weight", 0.0) or 0.0))

    def evaluate(self, config, model, params, mesh, rules, cache):
        return classification_eval(config, model, params, mesh, rules)

    def config_problems(self, config) -> list[str]:
        problems = image_text_only_problems(config, self.name) + _fusion_problems(config.model)
        if config.data.name != "digits":
            problems.append(f"data.name={config.data.name!r}: task 'classification' needs the labelled digits "
                            f"(data.name='digits')")
        return problems


def _fusion_problems(m) -> list[str]:
    f, problems = m.fusion, []
    if f.mode not in FUSION_MODES:
        problems.append(f"model.fusion.mode: {f.mode!r}; choose one of {FUSION_MODES}")
    if f.num_classes <= 0:
        problems.append(f"model.fusion.num_classes must be positive, got {f.num_classes}")
    elif f.num_classes < 2:
        problems.append(f"model.fusion.num_classes={f.num_classes}: the image-caption pairs have labels 0/1; "
                        f"use >= 2")
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


