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
# No JAX persistent compilation cache in the tests. It saved ~20 % of the time of the tests that start processes,
# but a worker segfaulted twice in JAX's compilation_cache.get_executable_and_time while reading an entry (both
# times for mmjax.training.integrity's checksum program, 2026-12-05; once with one cache for both workers, once
# with one per worker), and pytest-xdist then hung waiting for the dead worker. Not reproduced outside the suite
# (reading 120 entries back in fresh processes, truncated entries included, worked), so the cause is not known;
# every process compiles for itself. Without the cache the same program crashed twice more in XLA's compile
# (backend_compile_and_load, 2026-12-05, during `mmjax train`'s checkpoint save in test_legacy_workdir and
# test_img2dataset; once built with its own compiler options, once without), so the cache is not the cause
# either; 200 compiles of it in one process (clear_caches between) did not crash. Open.
os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)

import jax  # noqa: E402  (after the flags above)

jax.config.update("jax_num_cpu_devices", 8)
