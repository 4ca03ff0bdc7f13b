"""Embedding many inputs on the mesh: the one padded-batch helper under every evaluator.

`padded_batches` cuts inputs (dicts of numpy [N, ...]) into fixed-size batches sharded over the batch axes, the
last one padded by repeating its last row, so each function compiles once. `TowerEncoder` runs a model's
`encode_image` / `encode_text` / audio `encode` over them and returns numpy arrays; `batched_apply` runs any
jitted `fn(params, batch) -> dict of [b] arrays`. Training's evaluation, `mmjax eval` and `mmjax.load` use them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from mmjax.runtime import sharding as shd


def round_batch(batch_size: int, mesh: Mesh) -> int:
    """`batch_size` rounded down to a multiple of the batch-sharded devices (at least one row each)."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    return max(shards, (batch_size // shards) * shards)


def padded_batches(inputs: dict[str, np.ndarray], batch_size: int, mesh: Mesh) -> Iterator[tuple[dict, int]]:
    """Yields (batch: dict of global arrays [batch_size, ...] sharded over the batch axes, rows: how many of its
    rows are real) over `inputs` (dict of numpy [N, ...], equal N); the last batch is padded by repeating its last
    row. `batch_size` must be a multiple of the batch-sharded devices (`round_batch`)."""
    n = len(next(iter(inputs.values())))
    sharding = shd.batch_sharding(mesh)
    for start in range(0, n, batch_size):
        rows = min(batch_size, n - start)
        batch = {}
        for k, v in inputs.items():
            chunk = v[start:start + batch_size]
            if rows < batch_size:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - rows, axis=0)])
            batch[k] = jax.make_array_from_callback(chunk.shape, sharding, lambda idx, c=chunk: c[idx])
        yield batch, rows


def batched_apply(fn: Callable, params, inputs: dict[str, np.ndarray], mesh: Mesh, rules,
                  batch_size: int) -> dict[str, np.ndarray]:
    """Runs jitted `fn(params, batch) -> dict of [b] arrays` over `inputs` (dict of [N, ...]) in padded batches
    sharded over the batch axes. Returns the outputs concatenated, [N] each."""
    out: dict[str, list[np.ndarray]] = {}
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        for batch, rows in padded_batches(inputs, round_batch(batch_size, mesh), mesh):
            for k, v in jax.device_get(fn(params, batch)).items():
                out.setdefault(k, []).append(np.asarray(v)[:rows])
    return {k: np.concatenate(v) for k, v in out.items()}


class TowerEncoder:
    """Encodes inputs with params on `mesh`; outputs are L2-normalised float32 numpy [N, D]."""

    def __init__(self, model: nn.Module, params, mesh: Mesh, rules, batch_size: int = 256):
        self.model, self.params, self.mesh, self.rules = model, params, mesh, rules
        self.batch_size = round_batch(batch_size, mesh)
        self._fns: dict[str, Callable] = {}

    def _fn(self, key: str, apply: Callable) -> Callable:
        if key not in self._fns:
            self._fns[key] = jax.jit(apply, out_shardings=shd.replicated(self.mesh))
        return self._fns[key]

    def _run(self, fn: Callable, inputs: dict[str, np.ndarray]) -> np.ndarray:
        out = []
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            for batch, rows in padded_batches(inputs, self.batch_size, self.mesh):
                out.append(np.asarray(fn(self.params, batch))[:rows])
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 0), np.float32)

    def encode(self, method: str, inputs: np.ndarray) -> np.ndarray:
        """inputs: [N, ...] numpy, already preprocessed/tokenised, for the model method `method`. Returns [N, D]."""
        fn = self._fn(method, lambda params, x: self.model.apply({"params": params}, x["x"], method=method))
        return self._run(fn, {"x": inputs})

    def encode_image(self, images: np.ndarray) -> np.ndarray:
        return self.encode("encode_image", images)

    def encode_text(self, tokens: np.ndarray) -> np.ndarray:
        return self.encode("encode_text", tokens)

    def encode_audio(self, waveforms: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """waveforms float32 [N, T], lengths int [N] -> unit-norm float32 [N, D] (the audio tower)."""
        fn = self._fn("audio", lambda params, x: self.model.apply({"params": params}, "audio", x, method="encode"))
        return self._run(fn, {"waveform": waveforms, "length": lengths})


def require_fields(data: dict, fields: Sequence[str], evaluator: str) -> None:
    """Raises ValueError naming the first of `fields` that `data` lacks."""
    for f in fields:
        if f not in data:
            raise ValueError(f"the {evaluator} evaluator needs a {f!r} field in its dataset, which has "
                             f"only {sorted(data)}")


def embed(encoder: TowerEncoder, method: str, inputs: np.ndarray, desc: str = "",
          progress: bool = False) -> np.ndarray:
    """encoder.encode(method, inputs) one encoder batch at a time, with a tqdm bar when `progress`."""
    bs = encoder.batch_size
    starts = range(0, len(inputs), bs)
    if progress:
        starts = tqdm(starts, desc=desc, unit="batch", leave=False)
    out = [encoder.encode(method, inputs[s:s + bs]) for s in starts]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


