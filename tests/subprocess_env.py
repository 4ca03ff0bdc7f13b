"""The environment for the `mmjax` processes tests start."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DEVICE_COUNT = "--xla_force_host_platform_device_count="


def mmjax_env(devices: int | None = None, **extra: str) -> dict:
    """os.environ for a child process: the CPU backend, this checkout importable, the suite's compile flags
    (conftest.TEST_XLA_FLAGS, inherited through XLA_FLAGS) and `devices` fake CPU devices (None: one, as in
    a user's run), plus `extra`."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_COUNT)]
    if devices is not None:
        flags.append(f"{_DEVICE_COUNT}{devices}")
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, XLA_FLAGS=" ".join(flags), **extra)
