"""`mmjax compile`: topology names, and ahead-of-time compiles of the real train step for a TPU slice.

The compiles need libtpu (the `tpu` extra) and are skipped without it. They run the command line in a
fresh process: the TPU compiler there sees a v5e-8 slice (8 chips, 16 GiB each) that is not attached.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from mmjax.commands import compile as compile_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo.py")
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu]')")
# A smaller demo: the compile, not the model, is under test.
SMALL = ["--config.model.image.depth=1", "--config.model.text.depth=1"]


@pytest.mark.parametrize("name,chips,libtpu_name,gen", [
    ("v5p-256", 128, "v5p:4x4x8", "v5p"),  # v5p names count TensorCores: 2 per chip
    ("v4-8", 4, "v4:2x2x1", "v4"),
    ("v4-128", 64, "v4:4x4x4", "v4"),
    ("v6e-256", 256, "v6e:16x16", "v6e"),  # v5e/v6e names count chips
    ("v5e-8", 8, "v5e:2x4", "v5e"),
    ("v5litepod-16", 16, "v5e:4x4", "v5e"),
])
def test_topology_names(name, chips, libtpu_name, gen):
    topo = compile_lib.parse_topology(name)
    assert topo.chips == chips
    assert topo.libtpu_topology == libtpu_name
    assert topo.generation is compile_lib.GENERATIONS[gen]


def test_topology_wrap_and_hbm():
    assert compile_lib.parse_topology("v5p-256").wrap == (True, True, True)  # a full torus
    assert compile_lib.parse_topology("v4-8").wrap == (False, False, False)
    hbm = {g: compile_lib.parse_topology(n).generation.hbm_bytes / 2 ** 30
           for g, n in [("v4", "v4-8"), ("v5e", "v5e-8"), ("v5p", "v5p-8"), ("v6e", "v6e-8")]}
    assert hbm == {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}


@pytest.mark.parametrize("bad", ["v5p-255", "v3-8", "v5p", "tpu-8", "v4-6"])
def test_bad_topology_names(bad):
    with pytest.raises(ValueError, match="topology"):
        compile_lib.parse_topology(bad)


def test_model_flops_of_vit_b16_clip():
    from mmjax.config import load_config_file

    config = load_config_file(os.path.join(ROOT, "configs", "clip_vit_b16.py"))
    # ~41 GFLOPs forward per image-text pair (ViT-B/16 at 224 plus the 77-token text tower), x3.
    per_example = compile_lib.model_flops_per_step(config) / config.train.batch_size
    assert 3 * 38e9 < per_example < 3 * 45e9


def test_out_of_memory_message_parsed():
    topo = compile_lib.parse_topology("v5e-8")
    r = compile_lib.out_of_memory("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required "
                                  "for HLO temporaries (96.13G) exceeds available HBM (15.75G).", topo)
    assert r["fits"] is False and r["bytes_per_chip"] == int(96.13 * 2 ** 30)
    r = compile_lib.out_of_memory("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 34.50G "
                                  "of 15.48G hbm. Exceeded hbm capacity by 19.02G.", topo)
    assert r["bytes_per_chip"] == int(34.5 * 2 ** 30) and r["flops_per_chip"] is None


def _compile(tmp_path, *overrides, config=DEMO):
    out = tmp_path / "report.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT] + sys.path))
    env.pop("XLA_FLAGS", None)  # the host needs no fake CPU devices; mmjax compile asks for its own
    env.pop("JAX_PLATFORMS", None)  # mmjax compile picks the CPU host itself
    proc = subprocess.run(
        [sys.executable, "-m", "mmjax", "compile", "--config", config, "--topology", "v5e-8",
         "--json", str(out), *SMALL, *overrides],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    report = json.loads(out.read_text()) if out.exists() else None
    return proc, report


@needs_libtpu
def test_demo_compiles_for_v5e_8(tmp_path):
    proc, r = _compile(tmp_path, "--config.mesh.data=2", "--config.mesh.fsdp=4")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "fits" in proc.stdout and "FLOPs per step" in proc.stdout
    assert r["topology"] == "v5e-8" and r["chips"] == 8 and r["devices"] == 8
    assert "v5 lite" in r["device_kind"].lower()
    assert r["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    assert r["fits"] is True and r["hbm_bytes_per_chip"] == 16 * 2 ** 30
    parts = r["argument_bytes"] + r["output_bytes"] - r["alias_bytes"] + r["temp_bytes"] + r["code_bytes"]
    assert r["bytes_per_chip"] == parts > 0
    assert r["alias_bytes"] > 0  # the donated state is updated in place
    assert r["flops_per_chip"] > 0 and r["flops_per_step"] == pytest.approx(8 * r["flops_per_chip"])
    # Forward + backward is at least 6 FLOPs per parameter per example (matmuls alone).
    assert r["flops_per_step"] > 2 * r["params"] * r["global_batch"]
    # The demo does not scan its layers, so XLA's count and the model count agree (XLA adds the
    # elementwise work).
    assert r["xla_counts_scan_body_once"] is False
    assert "sampler" not in r  # contrastive: nothing to generate
    assert 0.9 < r["flops_per_step"] / r["model_flops_per_step"] < 2.0
    assert r["model_flops_per_chip"] == pytest.approx(r["model_flops_per_step"] / 8)


@needs_libtpu
def test_audio_text_config_compiles_with_its_audio_input(tmp_path):
    # The step's inputs are the towers' (audio, text), as in training; the image of the image-text configs
    # would leave the audio-text pair without its audio.
    proc, r = _compile(tmp_path, config=os.path.join(ROOT, "configs", "audio_text.py"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert r["fits"] is True and r["flops_per_step"] > r["model_flops_per_step"] > 0


@needs_libtpu
def test_oversized_batch_does_not_fit(tmp_path):
    # 262,144 examples: the B x B logits alone are 32,768 x 262,144 float32 = 32 GiB per chip.
    proc, r = _compile(tmp_path, "--config.train.batch_size=262144")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "DOES NOT FIT" in proc.stdout
    assert r["fits"] is False
    assert r["bytes_per_chip"] > r["hbm_bytes_per_chip"] == 16 * 2 ** 30


def test_compile_without_libtpu_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "libtpu", None)  # `import libtpu` fails, installed or not
    with pytest.raises(compile_lib.LibtpuMissing, match="libtpu"):
        compile_lib.topology_devices(compile_lib.parse_topology("v5e-8"))


@needs_libtpu
def test_multislice_mesh_puts_slices_on_data():
    from mmjax.config import ConfigError, apply_overrides, load_config_file

    devices = compile_lib.topology_devices(compile_lib.parse_topology("v5e-8"), num_slices=2)
    assert len(devices) == 16
    config = apply_overrides(load_config_file(DEMO), ["mesh.data=2", "mesh.fsdp=-1"])
    mesh = compile_lib.topology_mesh(config.mesh, devices, num_slices=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 8, "tensor": 1}
    assert [d.slice_index for d in mesh.devices[:, 0, 0]] == [0, 1]  # data crosses slices (DCN)
    assert {d.slice_index for d in mesh.devices[0].flat} == {0}  # fsdp stays within a slice (ICI)
    config = apply_overrides(load_config_file(DEMO), ["mesh.data=1", "mesh.fsdp=-1"])
    with pytest.raises(ConfigError, match="num-slices"):
        compile_lib.topology_mesh(config.mesh, devices, num_slices=2)


@needs_libtpu
@pytest.mark.parametrize("config,what", [("coca_digits.py", "greedy captions"), ("flamingo_digits.py", "greedy text")])
def test_a_generative_config_compiles_its_sampler_too(tmp_path, config, what):
    # The KV-cached generation program is compiled on the train step's mesh and parameter shardings, its memory
    # reported like the step's. (Flamingo's step reads flat images that its objective packs into sequences.)
    proc, small = _compile(tmp_path, "--config.mesh.data=8", "--sample-batch=80", config=os.path.join(ROOT, "configs",
                                                                                                      config))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sampler = small["sampler"]
    assert sampler["batch"] == 80 and sampler["fits"] is True and f"sampler (80 rows: {what}" in proc.stdout
    assert sampler["bytes_per_chip"] == (sampler["argument_bytes"] + sampler["output_bytes"] - sampler["alias_bytes"]
                                         + sampler["temp_bytes"] + sampler["code_bytes"]) > 0
    assert small["fits"] is True and small["flops_per_step"] > 0  # the train step as before
