"""Embedding many inputs on the mesh, and zero-shot classification.

`TowerEncoder` runs a model's `encode_image` / `encode_text` over arbitrarily many inputs in fixed-size,
padded, batch-sharded chunks (one compile per tower) and returns numpy arrays. The training loop, the
inference API and evaluation all use it.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh

from mmjax import sharding as shd


class TowerEncoder:
    """Encodes inputs with params on `mesh`; outputs are L2-normalised float32 numpy [N, D]."""

    def __init__(self, model: nn.Module, params, mesh: Mesh, rules, batch_size: int = 256):
        self.model, self.params, self.mesh, self.rules = model, params, mesh, rules
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        self.batch_size = max(shards, (batch_size // shards) * shards)
        self._fns = {}

    def _fn(self, method: str):
        if method not in self._fns:
            def apply(params, x):
                return self.model.apply({"params": params}, x, method=method)

            self._fns[method] = jax.jit(apply, out_shardings=shd.replicated(self.mesh))
        return self._fns[method]

    def encode(self, method: str, inputs: np.ndarray) -> np.ndarray:
        """inputs: [N, ...] numpy, already preprocessed/tokenised. Returns [N, D] float32."""
        n = len(inputs)
        sharding = shd.batch_sharding(self.mesh)
        fn = self._fn(method)
        out = []
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            for start in range(0, n, self.batch_size):
                chunk = inputs[start:start + self.batch_size]
                pad = self.batch_size - len(chunk)
                if pad:
                    chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
                x = jax.make_array_from_callback(chunk.shape, sharding, lambda idx, c=chunk: c[idx])
                out.append(np.asarray(fn(self.params, x))[: self.batch_size - pad])
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 0), np.float32)

    def encode_image(self, images: np.ndarray) -> np.ndarray:
        return self.encode("encode_image", images)

    def encode_text(self, tokens: np.ndarray) -> np.ndarray:
        return self.encode("encode_text", tokens)


def zeroshot_weights(encoder: TowerEncoder, tokenizer, class_names: Sequence[str],
                     templates: Sequence[str]) -> np.ndarray:
    """Class embeddings [C, D]: each class's prompt embeddings averaged, then re-normalised."""
    prompts = [t.format(c) for c in class_names for t in templates]
    emb = encoder.encode_text(tokenizer.encode(prompts)).reshape(len(class_names), len(templates), -1)
    w = emb.mean(axis=1)
    return w / np.linalg.norm(w, axis=-1, keepdims=True)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows whose label is among the k largest logits."""
    topk = np.argsort(-logits, axis=-1)[:, :k]
    return float(np.mean(np.any(topk == labels[:, None], axis=-1)))


def zeroshot_eval(encoder: TowerEncoder, tokenizer, images: np.ndarray, labels: np.ndarray,
                  class_names: Sequence[str], templates: Sequence[str]) -> dict[str, float]:
    """Zero-shot top-1/top-5 of preprocessed `images` [N,H,W,C] against prompts for `class_names`."""
    w = zeroshot_weights(encoder, tokenizer, class_names, templates)
    logits = encoder.encode_image(images) @ w.T
    result = {"zeroshot/top1": topk_accuracy(logits, labels, 1)}
    if len(class_names) > 5:
        result["zeroshot/top5"] = topk_accuracy(logits, labels, 5)
    return result
