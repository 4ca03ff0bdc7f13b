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
import sys
import time
from typing import Any, Mapping

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
    runs, `mmjax.models.layers.Encoder` query_index): k and v projections for every token, the rest for one.
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


def train_flops_per_example(config, pooled_only: bool | None = None) -> float:
    """Model FLOPs of one training example: 3 x (forward of every tower + its share of the loss).

    The towers are those of `config.model.towers` (what `mmjax.models.build_model` builds). The contrastive
    logits cost 2 B D per example and modality pair of `config.model.pairs` (B = global batch). Fusion/ITM heads of the other tasks are
    not counted (their towers dominate). Task 'contrastive' reads only the towers' pooled features, so their
    last blocks compute the pooled token only (`encoder_forward_flops` pooled_only); the count follows.
    pooled_only=False counts full last blocks (what a model that computes every token's output does, e.g.
    open_clip's), None decides by the task.
    """
    m = config.model
    if pooled_only is None:
        pooled_only = config.get("task", "contrastive") == "contrastive"
    embed_dim = int(m.embed_dim)
    active = tuple(m.get("towers", ("image", "text")))  # model.towers: the towers build_model builds
    towers = [name for name in TOWER_FLOPS if name in active and _section(m, name) is not None]
    forward = sum(TOWER_FLOPS[name](_section(m, name), embed_dim, pooled_only) for name in towers)
    pairs = len(m.get("pairs", ())) or 1  # model.pairs: one B x B logits matrix per modality pair
    forward += pairs * 2.0 * int(config.train.batch_size) * embed_dim
    return 3.0 * forward


# --------------------------------------------------------------------------------------------- CPU flags

# XLA:CPU flags that made mmjax's train step faster, by the jaxlib versions they were measured on (XLA aborts
# on a flag it does not know, so they are only ever added for these). On jaxlib 0.10, XLA hands each matmul to
# YNNPACK by default; its own Eigen path ran a 2048^2 float32 matmul at ~130 GFLOP/s against YNNPACK's ~107 on
# a 2-core AVX-512 host, and the ViT-B/32 CLIP step ~17 % faster (README, "Speed").
CPU_XLA_FLAGS: dict[str, tuple[str, ...]] = {
    "0.10.": ("--xla_cpu_experimental_ynn_fusion_type=-individual_dot",),
}
_ACCELERATOR_PLUGINS = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin",
                        "jax_rocm60_plugin")


def tune_cpu_xla_flags(environ=None) -> tuple[str, ...]:
    """Adds `CPU_XLA_FLAGS` for the installed jaxlib to `environ['XLA_FLAGS']` (default `os.environ`) and
    returns what it added. Call it before JAX creates its backends (the `mmjax` command does).

    Adds nothing when MMJAX_XLA_CPU_DEFAULTS=1, when XLA_FLAGS already sets the same option, or when an
    accelerator plugin is installed and JAX_PLATFORMS is not 'cpu' (another XLA build parses XLA_FLAGS there).
    """
    import importlib.metadata

    environ = os.environ if environ is None else environ
    if not _cpu_defaults_apply(environ):
        return ()
    try:
        version = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return ()
    current = environ.get("XLA_FLAGS", "")
    flags = next((f for prefix, f in CPU_XLA_FLAGS.items() if version.startswith(prefix)), ())
    added = tuple(f for f in flags if f.split("=", 1)[0] not in current)
    if added:
        environ["XLA_FLAGS"] = " ".join([current.strip(), *added]).strip()
    return added


def _cpu_defaults_apply(environ) -> bool:
    """False when MMJAX_XLA_CPU_DEFAULTS=1, or when an accelerator plugin is installed and JAX_PLATFORMS is not
    'cpu' (then JAX runs on the accelerator and another XLA build parses XLA_FLAGS)."""
    import importlib.util

    if environ.get("MMJAX_XLA_CPU_DEFAULTS") == "1":
        return False
    return environ.get("JAX_PLATFORMS", "").strip() == "cpu" or not any(
        importlib.util.find_spec(name) is not None for name in _ACCELERATOR_PLUGINS)


# glibc's malloc serves every block above 32 MiB with a fresh mmap and unmaps it when it is freed. XLA:CPU
# allocates a step's temporaries as one block per execution (886 MB for a 2-layer ViT-B/32 step at batch 32),
# so every step maps new memory and the kernel faults it in 4 KiB pages: 360 k faults and 1.1 s of system time
# per 4-layer step, 13 % of the CPU time of a text transformer block (perf). glibc >= 2.35 can ask for
# transparent huge pages on those mappings, faulted 2 MiB at a time (measured: 360 k -> 2-3 k faults per step,
# 1.1 -> 0.36 s of system time; 12-layer step 1.92 -> 2.18 samples/s in alternating rounds). glibc reads
# GLIBC_TUNABLES only when a process starts, so the `mmjax` command re-executes itself once with it set.
CPU_MALLOC_TUNABLE = "glibc.malloc.hugetlb=1"


def cpu_malloc_tunables(environ=None, *, libc: tuple[str, str] | None = None,
                        thp_mode: str | None = None) -> str | None:
    """The GLIBC_TUNABLES value `mmjax train`/`eval` should run with, or None to leave the process as it is.

    None unless: the CPU defaults apply (see `tune_cpu_xla_flags`), the C library is glibc >= 2.35, the
    kernel's transparent huge pages are in 'madvise' mode (with 'always' every mapping gets them already,
    with 'never' none can) and GLIBC_TUNABLES does not set `glibc.malloc.hugetlb` itself. `libc` and
    `thp_mode` default to what this machine reports.
    """
    environ = os.environ if environ is None else environ
    if not _cpu_defaults_apply(environ):
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in current:
        return None
    name, version = platform.libc_ver() if libc is None else libc
    try:
        new_enough = tuple(int(v) for v in version.split(".")[:2]) >= (2, 35)
    except ValueError:
        new_enough = False
    if name != "glibc" or not new_enough:
        return None
    if thp_mode is None:
        try:
            with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
                thp_mode = f.read().split("[", 1)[1].split("]", 1)[0]
        except (OSError, IndexError):
            return None
    if thp_mode != "madvise":
        return None
    return ":".join(t for t in (current, CPU_MALLOC_TUNABLE) if t)


def reexec_with_cpu_malloc_tunables() -> None:
    """Replaces this process by the same command line with `cpu_malloc_tunables()` in its environment; returns
    (changing nothing) when there is nothing to set. Call it first thing in a process entry point."""
    value = cpu_malloc_tunables()
    if value is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], dict(os.environ, GLIBC_TUNABLES=value))


# ------------------------------------------------------------------------------------------------- peaks

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
    import jax
    import jax.numpy as jnp

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
        import jax

        local_cpus = max(1, sum(d.platform == "cpu" for d in jax.local_devices()))
        return cpu_peak_flops() / local_cpus
    for name, peak in PEAK_FLOPS:
        if name in kind:
            return peak
    return None


class SpeedMeter:
    """Turns samples/s into TFLOP/s per device and MFU for one run (flops per example and peak fixed)."""

    def __init__(self, config, devices):
        self.flops_per_example = train_flops_per_example(config)
        self.num_devices = len(devices)
        self.peak = peak_flops_per_device(devices[0])

    def metrics(self, samples_per_second: float) -> dict[str, float]:
        """{'tflops_per_device', 'mfu' (when the peak is known)} for a measured samples/s."""
        per_device = self.flops_per_example * samples_per_second / self.num_devices
        out = {"tflops_per_device": per_device / 1e12}
        if self.peak:
            out["mfu"] = per_device / self.peak
        return out


if __name__ == "__main__":  # python -m mmjax.speed: measure (again) and cache this host's CPU peak
    import jax

    jax.config.update("jax_platforms", "cpu")
    print(f"mmjax: float32 matmul peak of this CPU: {cpu_peak_flops(refresh=True) / 1e9:.1f} GFLOP/s "
          f"(cached in {_cache_path()})")
