"""`mmjax.load(workdir)`: a trained model as two functions, images -> vectors and text -> vectors.

    import mmjax
    model = mmjax.load("W")                  # latest checkpoint in W
    img = model.encode_image(uint8_images)   # [N,H,W,C] or [N,H,W], any size -> [N, D], unit norm
    txt = model.encode_text(["a photo of the number seven"])
    probs = softmax(model.logit_scale * img @ txt.T)
    model.caption(images, beam=4)            # a captioner's workdir (task 'coca'): one string per image
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from mmjax import config as config_lib
from mmjax import storage
from mmjax.config import EOT_ID, PAD_ID
from mmjax.data.image import preprocess_images
from mmjax.data.tokenizers import get_tokenizer
from mmjax.errors import MmjaxError
from mmjax.eval import captioning
from mmjax.eval.encoder import TowerEncoder
from mmjax.models.coca import CocaModel, coca_logits_fn
from mmjax.runtime import sharding as shd
from mmjax.tasks.coca import max_new_tokens as caption_room
from mmjax.training.checkpoint import Checkpointer
from mmjax.training.state import StateFactory


class CaptionError(MmjaxError, ValueError):
    """A captioning request the model cannot serve (a model that does not caption, a beam size <= 0, a prompt
    that leaves no room in the decoder's context, top_p outside (0, 1])."""


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

    def caption_tokens(self, images, prompt_ids: Sequence[int], *, beam: int = 1, top_p: float = 1.0,
                       max_new_tokens: int | None = None, eos_id: int = EOT_ID,
                       banned: tuple[int, ...] = (PAD_ID,), seed: int = 0,
                       preprocessed: bool = False) -> dict[str, np.ndarray]:
        """Token ids generated after `prompt_ids` (BOS first) for each image -> {'tokens' int32 [N,T] (EOS
        included, then pad), 'scores' float32 [N] (summed log-probabilities), 'lengths' int32 [N]}.

        images: uint8 [N,H,W(,C)] or a list of images of any sizes and channel counts (converted as
        `encode_image` does), or with `preprocessed` model-ready float32 [N,S,S,C]. beam > 1: beam search; else top_p < 1: nucleus sampling (`seed`); else greedy.
        T = max_new_tokens, default (and at most) what the context leaves after the prompt."""
        model = self.encoder.model
        if not isinstance(model, CocaModel):
            raise CaptionError(f"this workdir's model ({type(model).__name__}) does not "
                               f"generate text; captioning needs task 'coca'")
        if int(beam) < 1:
            raise CaptionError(f"beam size must be >= 1; got {beam}")
        if not 0.0 < float(top_p) <= 1.0:
            raise CaptionError(f"top_p must be in (0, 1]; got {top_p}")
        context = int(self.config.model.text.max_len)
        if len(prompt_ids) >= context:
            raise CaptionError(f"the prompt is {len(prompt_ids)} tokens (with BOS); the decoder's context is "
                               f"{context} tokens, which leaves no room to generate")
        room = caption_room(self.config, len(prompt_ids))
        n = room if max_new_tokens is None else max(1, min(int(max_new_tokens), context - len(prompt_ids)))
        img = self.config.model.image
        x = np.asarray(images, np.float32) if preprocessed else preprocess_images(
            list(images) if isinstance(images, (list, tuple)) else np.asarray(images), img.image_size,
            img.channels, self.config.data.image_mean, self.config.data.image_std)
        return captioning.generate(model, coca_logits_fn(model, tuple(banned)), self.params, x,
                                   np.asarray(prompt_ids, np.int32), self.encoder.mesh, self.encoder.rules,
                                   max_new_tokens=n, beam=int(beam), top_p=float(top_p),
                                   batch_size=self.encoder.batch_size, eos_id=eos_id, pad_id=PAD_ID, seed=seed)

    def caption(self, images, beam: int = 1, top_p: float = 1.0, prompt: str = "", seed: int = 0,
                preprocessed: bool = False) -> list[str]:
        """One caption per image (see `caption_tokens`): the prompt's text followed by what the model wrote."""
        ids = [self.tokenizer.bos_id] + self.tokenizer.text_to_ids(prompt)
        out = self.caption_tokens(images, ids, beam=beam, top_p=top_p, seed=seed, preprocessed=preprocessed)
        prompts = np.broadcast_to(np.asarray(ids, np.int32), (len(out["tokens"]), len(ids)))
        return self.tokenizer.decode(np.concatenate([prompts, out["tokens"]], axis=1))


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
