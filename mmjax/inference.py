"""`mmjax.load(workdir)`: a trained model as two functions, images -> vectors and text -> vectors.

    import mmjax
    model = mmjax.load("W")                  # latest checkpoint in W
    img = model.encode_image(uint8_images)   # [N,H,W,C] or [N,H,W], any size -> [N, D], unit norm
    txt = model.encode_text(["a photo of the number seven"])
    probs = softmax(model.logit_scale * img @ txt.T)
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from mmjax import config as config_lib
from mmjax import storage
from mmjax.data.image import preprocess_images
from mmjax.data.tokenizers import get_tokenizer
from mmjax.eval.encoder import TowerEncoder
from mmjax.runtime import sharding as shd
from mmjax.training.checkpoint import Checkpointer
from mmjax.training.state import StateFactory


class LoadedModel:
    """A restored model with its own preprocessing and tokenizer. Outputs are numpy float32."""

    def __init__(self, config, factory: StateFactory, params, step: int, batch_size: int = 256):
        self.config, self.step, self.params = config, step, params  # params: the restored pytree (on device)
        self.tokenizer = get_tokenizer(config.model.text)
        self.encoder = TowerEncoder(factory.model, params, factory.mesh, factory.rules, batch_size)
        self.logit_scale = None  # a model without a temperature (task 'vq') has none
        if "logit_scale" in params:
            scale = np.exp(np.asarray(jax.device_get(params["logit_scale"]), np.float32))
            self.logit_scale = float(np.minimum(scale, np.exp(config.model.logit_scale_max)))
        self.logit_bias = (float(np.asarray(jax.device_get(params["logit_bias"])))
                           if "logit_bias" in params else None)
        # The task's own inference functions (task 'vq': encode_tokens, decode_tokens; see Task.inference_methods).
        for name, fn in factory.task.inference_methods(config, factory.model, params, factory.mesh, factory.rules,
                                                       batch_size).items():
            setattr(self, name, fn)

    def preprocess(self, images: np.ndarray) -> np.ndarray:
        img = self.config.model.image
        return preprocess_images(np.asarray(images), img.image_size, img.channels,
                                 self.config.data.image_mean, self.config.data.image_std)

    def encode_image(self, images: np.ndarray) -> np.ndarray:
        """images: uint8 [N,H,W,C] or [N,H,W], any H, W. Returns L2-normalised [N, D]."""
        images = np.asarray(images)
        if images.ndim not in (3, 4):
            raise ValueError(f"encode_image expects [N,H,W] or [N,H,W,C] images, got shape {images.shape}")
        return self.encoder.encode_image(self.preprocess(images))

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """texts: list of strings. Returns L2-normalised [N, D]."""
        if isinstance(texts, str):
            raise TypeError("encode_text expects a list of strings, got a single string; wrap it in [ ]")
        return self.encoder.encode_text(self.tokenizer.encode(list(texts)))


def load(workdir: str, step: int | None = None, devices=None) -> LoadedModel:
    """Restores the checkpoint at `step` (default: the newest that passes verification, saying so when that is
    not the latest) of a training workdir for inference. A checkpoint that fails verification is never loaded:
    with `step` given, CheckpointDamagedError names the step and what failed."""
    config = config_lib.load_workdir_config(workdir)  # unlocked
    devices = list(jax.devices()[:1] if devices is None else devices)
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = len(devices), 1, 1
    config.lock()
    ckpt = Checkpointer(storage.join(workdir, "checkpoints"), async_save=False, read_only=True)
    try:
        chosen = ckpt.choose_step(step)
        factory = StateFactory(config, shd.make_mesh(config.mesh, devices))
        if step is None:
            chosen, state = ckpt.restore_latest(factory.abstract)
        else:
            state = ckpt.restore(chosen, factory.abstract)
    finally:
        ckpt.close()
    return LoadedModel(config, factory, state.params, chosen)
