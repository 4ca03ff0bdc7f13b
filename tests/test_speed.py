"""Know your speed: analytic model FLOPs agree with XLA's count; the CPU peak is measured once and cached;
training logs carry samples/s, TFLOP/s per device and MFU; micro-batched steps equal large-batch steps;
periodic evaluation writes its metrics."""

import json

import jax
import numpy as np
import pytest
from test_config import tiny
from test_sharding import _one_step

from mmjax import config as config_lib
from mmjax.runtime import cpu
from mmjax.runtime import flops as speed
from mmjax.runtime import sharding as shd
from mmjax.tasks import make_objective
from mmjax.training.loop import train
from mmjax.training.state import StateFactory
from mmjax.training.step import make_train_step


def _wider(overrides=()):
    return config_lib.apply_overrides(tiny(), [
        "config.model.image.width=128", "config.model.image.mlp_dim=512", "config.model.text.width=128",
        "config.model.text.mlp_dim=512", "config.model.embed_dim=64", "config.model.image.image_size=32",
        "config.model.image.patch_size=4", "config.model.text.max_len=32", "config.train.batch_size=16",
        "config.mesh.data=1", *overrides])


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_analytic_flops_match_xla_cost_analysis(pool):
    c = _wider([f"config.model.image.pool={pool}"])
    mesh = shd.make_mesh(c.mesh, jax.devices()[:1])
    factory = StateFactory(c, mesh)
    step = jax.jit(make_train_step(factory.model, factory.tx, factory.schedule, make_objective(c, mesh),
                                   trainable=factory.trainable))
    batch = {"image": jax.ShapeDtypeStruct((16, 32, 32, 3), np.float32),
             "text": jax.ShapeDtypeStruct((16, 32), np.int32)}
    with jax.set_mesh(mesh):
        cost = step.lower(factory.abstract, batch).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    analytic = speed.train_flops_per_example(c, pooled_only=True) * 16
    assert abs(cost["flops"] / analytic - 1) < 0.10, (cost["flops"], analytic)


def test_encoder_flops_scale_with_depth_and_quadratically_with_length():
    one = speed.encoder_forward_flops(10, 64, 1, 256)
    assert speed.encoder_forward_flops(10, 64, 3, 256) == pytest.approx(3 * one)
    attn = lambda n: speed.encoder_forward_flops(n, 64, 1, 256) - n * 2 * (4 * 64 * 64 + 2 * 64 * 256)  # noqa
    assert attn(20) == pytest.approx(4 * attn(10))


def test_cpu_peak_is_measured_once_then_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("MMJAX_CACHE_DIR", str(tmp_path))
    calls = []
    monkeypatch.setattr(speed, "measure_matmul_flops", lambda: calls.append(1) or 1.5e11)
    assert speed.cpu_peak_flops() == 1.5e11
    assert speed.cpu_peak_flops() == 1.5e11
    assert len(calls) == 1
    assert json.loads((tmp_path / "cpu_peak.json").read_text())
    assert speed.cpu_peak_flops(refresh=True) == 1.5e11 and len(calls) == 2


def test_matmul_probe_measures_a_plausible_rate():
    flops = speed.measure_matmul_flops(n=256, repeats=2)
    assert 1e8 < flops < 1e14


def test_peak_table_knows_the_accelerators():
    class Dev:
        platform = "tpu"
        device_kind = "TPU v5 lite"
    assert speed.peak_flops_per_device(Dev()) == 197e12
    Dev.platform, Dev.device_kind = "gpu", "NVIDIA H100 80GB HBM3"
    assert speed.peak_flops_per_device(Dev()) == 989e12
    Dev.device_kind = "Some Future Chip"
    assert speed.peak_flops_per_device(Dev()) is None


def test_micro_batched_step_equals_large_batch_step():
    base = config_lib.apply_overrides(tiny(), ["config.mesh.data=4", "config.mesh.fsdp=2"])
    ref_params, ref_metrics, _ = _one_step(base, jax.devices())
    acc = config_lib.apply_overrides(tiny(), ["config.mesh.data=4", "config.mesh.fsdp=2",
                                              "config.train.micro_batches=2"])
    params, metrics, _ = _one_step(acc, jax.devices())
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_training_logs_speed_and_runs_periodic_eval(tmp_path):
    c = config_lib.apply_overrides(tiny(), ["config.eval.every_steps=4", "config.eval.zeroshot=True",
                                            "config.eval.retrieval=True", "config.mesh.data=1"])
    train(c, str(tmp_path), devices=jax.devices()[:1], verbose=False)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    evals = [r for r in rows if "zeroshot/top1" in r]
    assert [r["step"] for r in evals] == [4, 8]  # every 4 steps, the last one being the final eval
    assert all("retrieval/i2t/r1" in r for r in evals)
    logged = [r for r in rows if "samples_per_second" in r]
    assert logged and all(r["tflops_per_device"] > 0 and 0 < r["mfu"] for r in logged)


def test_cpu_xla_flags_are_added_once_and_only_where_measured(monkeypatch):
    import importlib.metadata

    env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.10.2")
    added = cpu.tune_cpu_xla_flags(env)
    assert added == cpu.CPU_XLA_FLAGS["0.10."]
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8 " + " ".join(added)
    assert cpu.tune_cpu_xla_flags(env) == () and env["XLA_FLAGS"].count(added[0]) == 1  # idempotent
    user = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot"}
    assert cpu.tune_cpu_xla_flags(user) == () and user["XLA_FLAGS"].endswith("=dot")  # the user's choice wins
    off = {"JAX_PLATFORMS": "cpu", "MMJAX_XLA_CPU_DEFAULTS": "1"}
    assert cpu.tune_cpu_xla_flags(off) == () and "XLA_FLAGS" not in off
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.11.0")  # not measured: XLA may not know it
    assert cpu.tune_cpu_xla_flags({"JAX_PLATFORMS": "cpu"}) == ()


def test_jax_starts_with_the_cpu_flags():
    """This jaxlib's XLA knows the flags it is given (it aborts on an unknown one); `mmjax train` and `eval`
    add them the same way before JAX starts, so every end-to-end test that runs the command runs them too."""
    import importlib.metadata
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import os; from mmjax.runtime import cpu; added = cpu.tune_cpu_xla_flags(); import jax; "
            "jax.devices(); print(added, os.environ['XLA_FLAGS'])")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root)
    env.pop("MMJAX_XLA_CPU_DEFAULTS", None)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    version = importlib.metadata.version("jaxlib")
    expected = next((f for p, f in cpu.CPU_XLA_FLAGS.items() if version.startswith(p)), ())
    assert all(f in r.stdout for f in expected)


def test_cpu_malloc_tunable_only_where_it_applies():
    """Huge pages for large malloc blocks: only on glibc >= 2.35 with THP in 'madvise' mode, appended to the
    user's own tunables, never over their own hugetlb choice, and off with MMJAX_XLA_CPU_DEFAULTS=1."""
    here = dict(libc=("glibc", "2.36"), thp_mode="madvise")
    assert cpu.cpu_malloc_tunables({"JAX_PLATFORMS": "cpu"}, **here) == cpu.CPU_MALLOC_TUNABLE
    mine = {"JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    assert cpu.cpu_malloc_tunables(mine, **here) == "glibc.malloc.arena_max=2:" + cpu.CPU_MALLOC_TUNABLE
    assert cpu.cpu_malloc_tunables({"JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, **here) is None
    assert cpu.cpu_malloc_tunables({"JAX_PLATFORMS": "cpu", "MMJAX_XLA_CPU_DEFAULTS": "1"}, **here) is None
    for libc in (("glibc", "2.31"), ("", ""), ("musl", "1.2")):
        assert cpu.cpu_malloc_tunables({"JAX_PLATFORMS": "cpu"}, libc=libc, thp_mode="madvise") is None
    for mode in ("always", "never"):
        assert cpu.cpu_malloc_tunables({"JAX_PLATFORMS": "cpu"}, libc=("glibc", "2.36"), thp_mode=mode) is None


def test_mmjax_command_restarts_itself_with_the_malloc_tunable(tmp_path):
    """`python -m mmjax train` runs with the tunable in its environment where this machine supports it (glibc
    reads it only at start, so the command re-executes itself), and says so; a bad config is still reported."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root)
    for name in ("MMJAX_XLA_CPU_DEFAULTS", "GLIBC_TUNABLES"):
        env.pop(name, None)
    missing = tmp_path / "missing.py"
    r = subprocess.run([sys.executable, "-m", "mmjax", "train", "--config", str(missing), "--workdir",
                        str(tmp_path / "w")], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "missing.py" in r.stdout + r.stderr
    expected = cpu.cpu_malloc_tunables(env)
    assert (f"GLIBC_TUNABLES={cpu.CPU_MALLOC_TUNABLE}" in r.stdout) == (expected is not None), r.stdout
