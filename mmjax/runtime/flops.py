"""Know your speed: model FLOPs per example (counted analytically), chip peaks, MFU.

MFU = (model FLOPs per example x samples/s) / (peak FLOP/s per device x devices). Model FLOPs are those of
the model's math, counted once: forward + backward = 3 x forward, matmuls and attention only (the
convention of PaLM/MaxText). Rematerialisation and GradCache's extra forward are hardware work, not model
work, so they lower MFU rather than inflate it. `train_flops_per_example` agrees with XLA's
`cost_analysis()` of the compiled step to within a few percent on an unscanned model (tests/test_speed.py;
a scanned layer stack is counted once by XLA, which is why the analytic count is the one reported).

Peaks are dense bf16 matmul FLOP/s per device from vendor data sheets (TPU figures per chip; v4 and v5p
expose one device per chip). The CPU has no data sheet: `cpu_peak_flops()` times a float32 matmul once and
caches the result in ~/.cache/mmjax/cpu_peak.json (override the folder with $MMJAX_CACHE_DIR).
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

# device_kind substring (lower case) -> dense bf16 peak FLOP/s per device. First match wins: more specific
# names come first.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("tpu v6 lite", 918e12),  # v6e (Trillium)
    ("tpu v6e", 918e12),
    ("tpu v5 lite", 197e12),  # v5e
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),  # v5p reports 'TPU v5'
    ("tpu v4", 275e12),
    ("h200", 989e12),
    ("h100", 989e12),  # SXM; the PCIe card is 756e12
    ("a100", 312e12),
)


# ------------------------------------------------------------------------------------------ model FLOPs

def encoder_forward_flops(tokens: int, width: int, depth: int, mlp_dim: int, pooled_only: bool = False) -> float:
    """Forward FLOPs of `depth` pre-LN transformer blocks on one sequence of `tokens` tokens.

    Per block: q, k, v and output projections 4 W^2, MLP 2 W M multiply-adds per token; attention
    scores and the weighted sum 2 N^2 W multiply-adds per sequence. One multiply-add = 2 FLOPs.
    pooled_only: the last block computes one query token (what a tower returning only its pooled features
    runs, `mmjax.models.transformer.Encoder` query_index): k and v projections for every token, the rest for one.
    """
    per_token = 4 * width * width + 2 * width * mlp_dim
    block = tokens * per_token + 2 * tokens * tokens * width
    if not pooled_only or depth == 0:
        return 2.0 * depth * block
    last = tokens * 2 * width * width + (per_token - 2 * width * width) + 2 * tokens * width
    return 2.0 * ((depth - 1) * block + last)


def _pooled_only(section: Mapping[str, Any], pooled_only: bool) -> bool:
    """Whether the tower runs its last block on the pooled token only: asked for, and the pooling reads one
    token ('cls' or 'eot'; mean pooling needs every token)."""
    return pooled_only and section.get("pool", "cls") in ("cls", "eot")


def image_forward_flops(img: Mapping[str, Any], embed_dim: int, pooled_only: bool = False) -> float:
    """ViT on one image: patch embedding, encoder, projection head."""
    patches = (int(img["image_size"]) // int(img["patch_size"])) ** 2
    tokens = patches + (1 if img.get("pool", "cls") == "cls" else 0)
    width = int(img["width"])
    patch_embed = 2.0 * patches * int(img["patch_size"]) ** 2 * int(img["channels"]) * width
    return (patch_embed + encoder_forward_flops(tokens, width, int(img["depth"]), int(img["mlp_dim"]),
                                                _pooled_only(img, pooled_only))
            + 2.0 * width * embed_dim)


def text_forward_flops(txt: Mapping[str, Any], embed_dim: int, pooled_only: bool = False) -> float:
    """Text transformer on one max_len sequence (the embedding lookup is a gather: no FLOPs) + head."""
    width = int(txt["width"])
    return (encoder_forward_flops(int(txt["max_len"]), width, int(txt["depth"]), int(txt["mlp_dim"]),
                                  _pooled_only(txt, pooled_only))
            + 2.0 * width * embed_dim)


def audio_forward_flops(aud: Mapping[str, Any], embed_dim: int, pooled_only: bool = False) -> float:
    """Spectrogram transformer on one max-length clip: patch embedding of the mel image, encoder, head.
    (The log-mel front end's FFT is not counted.)"""
    n_mels, max_frames = int(aud["n_mels"]), int(aud["max_frames"])
    pf, pt = int(aud["patch_freq"]), int(aud["patch_time"])
    patches = (n_mels // pf) * (max_frames // pt)
    tokens = patches + (1 if aud.get("pool", "cls") == "cls" else 0)
    width = int(aud["width"])
    return (2.0 * patches * pf * pt * width
            + encoder_forward_flops(tokens, width, int(aud["depth"]), int(aud["mlp_dim"]),
                                    _pooled_only(aud, pooled_only))
            + 2.0 * width * embed_dim)


TOWER_FLOPS = {"image": image_forward_flops, "text": text_forward_flops, "audio": audio_forward_flops}


def _section(model_cfg, name):
    section = model_cfg.get(name) if hasattr(model_cfg, "get") else model_cfg[name]
    if section is None:
        return None
    return section.to_dict() if hasattr(section, "to_dict") else dict(section)


def train_flops_per_example(config, pooled_only: bool = False) -> float:
    """Model FLOPs of one training example: 3 x (forward of every tower + its share of the loss).

    The towers are those of `config.model.towers` (what `mmjax.models.build_model` builds). The contrastive
    logits cost 2 B D per example and modality pair of `config.model.pairs` (B = global batch). Fusion/ITM heads of the other tasks are
    not counted (their towers dominate). pooled_only: the model reads only the towers' pooled features, so their
    last blocks compute the pooled token only (`encoder_forward_flops` pooled_only), as task 'contrastive' does
    (`Task.flops_per_example` says which); False counts full last blocks (what a model that computes every
    token's output does, e.g. open_clip's).
    """
    m = config.model
    embed_dim = int(m.embed_dim)
    active = tuple(m.get("towers", ("image", "text")))  # model.towers: the towers build_model builds
    towers = [name for name in TOWER_FLOPS if name in active and _section(m, name) is not None]
    forward = sum(TOWER_FLOPS[name](_section(m, name), embed_dim, pooled_only) for name in towers)
    pairs = len(m.get("pairs", ())) or 1  # model.pairs: one B x B logits matrix per modality pair
    forward += pairs * 2.0 * int(config.train.batch_size) * embed_dim
    return 3.0 * forward


def _cache_path() -> str:
    folder = os.environ.get("MMJAX_CACHE_DIR", os.path.expanduser("~/.cache/mmjax"))
    return os.path.join(folder, "cpu_peak.json")


def _cpu_key() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}|{os.cpu_count()} cpus"


def measure_matmul_flops(n: int = 1024, repeats: int = 8, device=None) -> float:
    """Best FLOP/s of a float32 [n,n] x [n,n] jitted matmul chain on `device` (default: the first)."""
    device = device or jax.devices()[0]
    x = jax.device_put(jnp.ones((n, n), jnp.float32) / n, device)

    @jax.jit
    def chain(a):
        for _ in range(4):
            a = a @ a
        return a

    chain(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        chain(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 4 * 2.0 * n ** 3 / best


def cpu_peak_flops(refresh: bool = False) -> float:
    """FLOP/s of this host's CPU for float32 matmuls: measured once (about a second), then cached per CPU
    model and core count."""
    path, key = _cache_path(), _cpu_key()
    cache: dict[str, float] = {}
    if os.path.isfile(path):
        try:
            with open(path) as f:
                cache = json.load(f)
        except (OSError, ValueError):
            cache = {}
    if not refresh and key in cache:
        return float(cache[key])
    peak = measure_matmul_flops()
    cache[key] = peak
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(cache, f, indent=1)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: measure again next time
    return peak


def peak_flops_per_device(device) -> float | None:
    """Peak FLOP/s of one `jax.Device`; None for an unknown accelerator. CPU devices share the host's cores,
    so each of the host's local CPU devices gets an equal share of the measured host peak."""
    kind = str(getattr(device, "device_kind", "")).lower()
    if device.platform == "cpu":

        local_cpus = max(1, sum(d.platform == "cpu" for d in jax.local_devices()))
        return cpu_peak_flops() / local_cpus
    for name, peak in PEAK_FLOPS:
        if name in kind:
            return peak
    return None


class SpeedMeter:
    """Turns samples/s into TFLOP/s per device and MFU for one run (flops per example and peak fixed)."""

    def __init__(self, flops_per_example: float, devices):
        """flops_per_example: the task's model FLOPs of one training example (`Task.flops_per_example`)."""
        self.flops_per_example = float(flops_per_example)
        self.num_devices = len(devices)
        self.peak = peak_flops_per_device(devices[0])

    def metrics(self, samples_per_second: float) -> dict[str, float]:
        """{'tflops_per_device', 'mfu' (when the peak is known)} for a measured samples/s."""
        per_device = self.flops_per_example * samples_per_second / self.num_devices
        out = {"tflops_per_device": per_device / 1e12}
        if self.peak:
            out["mfu"] = per_device / self.peak
        return out


if __name__ == "__main__":  # python -m mmjax.runtime.flops: measure (again) and cache this host's CPU peak

    jax.config.update("jax_platforms", "cpu")
    print(f"mmjax: float32 matmul peak of this CPU: {cpu_peak_flops(refresh=True) / 1e9:.1f} GFLOP/s "
          f"(cached in {_cache_path()})")


def cost_analysis(compiled) -> dict[str, Any]:
    """XLA's cost analysis of a compiled program as one dict ('flops', 'bytes accessed', ...); per device for an
    SPMD program."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
        cost = cost[0] if cost else {}
    return dict(cost or {})


def memory_bytes(compiled) -> dict[str, int]:
    """XLA's memory analysis of a compiled program, per device: {'argument', 'output', 'temp', 'alias', 'code'}
    bytes."""
    mem = compiled.memory_analysis()
    return dict(argument=int(mem.argument_size_in_bytes), output=int(mem.output_size_in_bytes),
                temp=int(mem.temp_size_in_bytes), alias=int(mem.alias_size_in_bytes),
                code=int(getattr(mem, "generated_code_size_in_bytes", 0)))
