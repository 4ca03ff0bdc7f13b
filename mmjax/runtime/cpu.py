"""CPU defaults applied before JAX starts its CPU backend: XLA flags that make the CPU step fast, and glibc's
transparent huge pages for large blocks (the `mmjax` command re-executes itself with them). Standard library
only, so the entry point can run it before importing JAX. MMJAX_XLA_CPU_DEFAULTS=1 turns both off.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import sys

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
