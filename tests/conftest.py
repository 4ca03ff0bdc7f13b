"""Every test process sees 8 CPU devices, so single- and multi-device runs can be compared.

The suite compiles hundreds of small programs and runs each for a few steps, so it asks XLA for cheap
compiles: LLVM at -O0 and the classic elemental emitters. On this 2-core machine that took the suite from
65 to 44 CPU-minutes. Results are unchanged (every equality test passes under both), and the demo test
runs as a user runs it, with XLA's defaults. `tests/subprocess_env.py` passes the same flags to the
`mmjax` processes tests start.
"""

import os

TEST_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")

os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *TEST_XLA_FLAGS,
                                    "--xla_force_host_platform_device_count=8"]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The CPU peak probe (mmjax.runtime.flops) caches its result; a probe taken under test load must not become the
# user's cached peak.
os.environ.setdefault("MMJAX_CACHE_DIR", os.path.join(os.environ.get("TMPDIR", "/tmp"), "mmjax-test-cache"))
# Many tests (and the processes they start: resumes, kills, the multi-process run) compile the same steps;
# JAX's persistent compilation cache compiles each once per machine. The env vars reach the subprocesses.
# Every program is cached, however quick its compile: at -O0 most take under the 0.5 s this used to require.
# One cache per pytest-xdist worker (shared by the processes that worker starts).
# History: four times (2026-12-05) a worker crashed inside XLA while building mmjax.training.integrity's checksum
# program, then one program over every leaf of the state: twice reading it from this cache, twice compiling it
# with the cache off, so the cache was not the cause. The checksums are now one small program per kind of leaf
# (the demo state's first checksums: 0.8-1.0 s instead of 5.5-7.3). Should a worker crash again, pytest-timeout
# (pytest.ini) ends the hang that used to follow.
_JAX_CACHE = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.environ["MMJAX_CACHE_DIR"], "jax"))
if os.environ.get("PYTEST_XDIST_WORKER") and not _JAX_CACHE.endswith(os.environ["PYTEST_XDIST_WORKER"]):
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(_JAX_CACHE, os.environ["PYTEST_XDIST_WORKER"])
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402  (after the flags above)

jax.config.update("jax_num_cpu_devices", 8)


def pytest_collection_modifyitems(items):
    """Files with end-to-end (`slow`) tests run first, each file's tests in their own order. pytest-xdist hands
    each worker whole files (`--dist loadfile`) and by default in order of their test count, which put files of
    one or two long tests (the demo's 80-110 s, text-to-image's 160 s) last, with the other worker idle. Started
    first, they leave the many short files to even out the end (pytest.ini: `--no-loadscope-reorder`)."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: every file's tests stay in order
