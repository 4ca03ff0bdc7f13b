"""`mmjax bench`: the train step timed on a synthetic batch reports figures that agree with each other and
with XLA, runs the step training runs, and refuses a bad config before compiling. The loader benchmark
(`python -m mmjax.data.bench --stages N`) reports each stage of a sample's path and the pipeline's total."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from subprocess_env import ROOT, mmjax_env
from test_config import TINY, tiny

from mmjax import config as config_lib
from mmjax.commands import bench
from mmjax.data import bench as data_bench
from mmjax.data import synthetic
from mmjax.tasks import dummy_batch


def test_synthetic_batch_has_the_step_inputs_shapes_and_valid_values():
    c = config_lib.apply_overrides(tiny(), ["config.model.towers=('image','text','audio')",
                                            "config.model.pairs=(('image','text',1.0),('audio','text',1.0))",
                                            "config.data.name=digits_speech"])
    batch = bench.synthetic_batch(c, 8, seed=1)
    shapes = dummy_batch(c, 8)
    assert sorted(batch) == ["audio", "image", "text"]
    for key, value in batch.items():
        assert value.shape == shapes[key].shape and value.dtype == shapes[key].dtype, key
    ids = batch["text"]
    lengths = (ids != 0).sum(axis=1)
    assert lengths.min() >= 2 and lengths.max() <= ids.shape[1]
    # real tokens first, padding after: each row is nonzero exactly on its first `length` positions
    assert ((ids != 0) == (np.arange(ids.shape[1])[None] < lengths[:, None])).all()
    assert ids.max() < c.model.text.vocab_size
    assert not np.array_equal(batch["image"], bench.synthetic_batch(c, 8, seed=2)["image"])
    # a process building only its rows of the global batch gets the same rows as one process building it all
    second_half = bench.synthetic_batch(c, 4, seed=1, start=4)
    for key, value in second_half.items():
        np.testing.assert_array_equal(value, batch[key][4:])

    fusion = config_lib.load_config_file(os.path.join(ROOT, "configs", "fusion_classifier.py"))
    labels = bench.synthetic_batch(fusion, 16)["label"]
    assert labels.shape == (16,) and 0 <= labels.min() and labels.max() < fusion.model.fusion.num_classes


def test_report_figures_agree_with_each_other_and_with_xla():
    # Batch 32: XLA's count includes every branch of the step's conditionals (the proven update, the exact check's
    # dry run and update, the bound's measurement), optimizer work the analytic model FLOPs leave out; 16 examples
    # per device keep it a small part of the step.
    c = config_lib.apply_overrides(tiny(), ["config.mesh.data=2", "config.train.batch_size=32"])
    lines = []
    r = bench.measure(c, steps=3, warmup=1, devices=jax.devices()[:2], log=lines.append)
    assert r["devices"] == 2 and r["mesh"]["data"] == 2 and r["global_batch"] == 32
    assert len(r["step_seconds"]) == 3 and r["median_step_seconds"] == sorted(r["step_seconds"])[1]
    assert r["samples_per_second"] == pytest.approx(32 / r["median_step_seconds"])
    assert r["tflops_per_device"] * 1e12 == pytest.approx(
        r["model_flops_per_example"] * r["samples_per_second"] / 2)
    assert r["mfu"] == pytest.approx(r["tflops_per_device"] * 1e12 / r["peak_flops_per_device"])
    # the analytic count of the step's work per device agrees with what XLA compiled (unscanned model)
    assert abs(r["xla_flops_per_device"] / r["model_flops_per_device"] - 1) < 0.15, r
    assert r["memory_bytes_per_device"]["temp"] > 0 and r["memory_bytes_per_device"]["argument"] > 0
    # real training steps ran: 4 steps on the one fixed batch take InfoNCE below chance, log(32)
    assert 0 < r["loss"] < np.log(32)
    assert "compiled in" in lines[0] and "mesh {'data': 2" in lines[0]
    text = bench.format_report(r)
    assert "samples/s" in text and "MFU" in text and "temporaries" in text


def test_step_timer_advances_the_state_like_training():
    c = config_lib.apply_overrides(tiny(), ["config.mesh.data=1", "config.train.batch_size=4"])
    timer = bench.StepTimer(c, jax.devices()[:1])
    first = jax.device_get(timer.state.params)
    assert timer.run(0) >= 0 and int(timer.state.step) == 0
    timer.run(2)
    assert int(timer.state.step) == 2 and np.isfinite(timer.metrics["loss"])
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(np.asarray(a) - b).max(),
                                         jax.device_get(timer.state.params), first))
    assert max(moved) > 0


def test_bad_counts_are_refused_by_name():
    with pytest.raises(ValueError, match="--steps"):
        bench.measure(tiny(), steps=0, warmup=1)


def _bench(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "mmjax", "bench", "--config", TINY, *args],
                          cwd=tmp_path, env=mmjax_env(devices=2), capture_output=True, text=True, timeout=600)


def test_cli_prints_and_writes_the_report(tmp_path):
    out = tmp_path / "bench.json"
    proc = _bench(tmp_path, "--steps", "2", "--warmup", "1", "--json", str(out),
                  "--config.train.batch_size=8", "--config.mesh.data=2")
    assert proc.returncode == 0, proc.stderr
    assert "samples/s" in proc.stdout and "MFU" in proc.stdout
    r = json.loads(out.read_text())
    assert r["devices"] == 2 and r["global_batch"] == 8 and r["samples_per_second"] > 0
    assert r["mfu"] is not None and 0 < r["mfu"]


def test_cli_refuses_a_batch_the_mesh_cannot_split_before_compiling(tmp_path):
    proc = _bench(tmp_path, "--config.train.batch_size=7", "--config.mesh.data=2")
    assert proc.returncode == 2
    assert "train.batch_size=7" in proc.stderr and "compiled" not in proc.stdout


@pytest.mark.slow
def test_two_processes_bench_the_same_global_step_as_one(tmp_path):
    args = ["--steps", "1", "--warmup", "1", "--config.train.batch_size=8", "--config.mesh.data=-1"]
    one = _bench(tmp_path, *args, "--json", str(tmp_path / "one.json"))
    assert one.returncode == 0, one.stderr
    env = mmjax_env(MMJAX_LOG_DIR=str(tmp_path / "logs"))  # local.sh gives each process 1 device
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # each process compiles for itself (see test_multiprocess)
    two = subprocess.run(["bash", "launch/local.sh", "2", "1", sys.executable, "-m", "mmjax", "bench", "--config",
                          TINY, *args, "--json", str(tmp_path / "two.json")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert a["devices"] == b["devices"] == 2 and (a["processes"], b["processes"]) == (1, 2)
    # the same global batch and step: the loss after 2 steps agrees
    assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
    assert b["samples_per_second"] > 0 and "samples/s" in two.stdout


@pytest.mark.slow
def test_vs_open_clip_times_both_sides_and_reports_consistent_figures(tmp_path):
    if importlib.util.find_spec("open_clip") is None:  # not imported here: the script readies torchvision first
        pytest.skip("the open_clip side needs pip install -e '.[openclip]'")
    out = tmp_path / "vs.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "vs_open_clip.py"), "--layers", "2", "--batch", "4",
         "--rounds", "2", "--steps", "1", "--warmup", "1", "--json", str(out)],
        cwd=tmp_path, env=mmjax_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = json.loads(out.read_text())
    assert r["ratio_mmjax_over_open_clip"] == pytest.approx(
        r["mmjax"]["samples_per_second"] / r["open_clip"]["samples_per_second"])
    for side in ("mmjax", "open_clip"):
        fractions = r[side]["fraction_of_peak_per_round"]
        assert len(fractions) == 2 and all(0 < f < 2 for f in fractions)
    # mmjax's pooled-only last blocks compute less than open_clip's full ones
    assert r["flops_per_example"]["mmjax"] < r["flops_per_example"]["open_clip"]
    assert "mmjax / open_clip:" in proc.stdout


def _loader_bench(tmp_path, *args):
    synthetic.write_webdataset(str(tmp_path / "shards"), 24, per_shard=12, seed=0, min_side=64, max_side=300)
    synthetic.write_spec(str(tmp_path / "shards"), "bench_pairs", "webdataset", "*.tar")
    return data_bench.main(["--config", TINY, "--config.data.name=spec",
                            f"--config.data.spec={tmp_path / 'shards' / 'spec.json'}",
                            f"--config.data.data_dir={tmp_path / 'tfds'}", "--config.train.batch_size=8",
                            "--steps", "2", "--warmup", "0", "--workers", "0", *args])


def test_loader_bench_stages_cover_a_sample_path_and_the_pipeline_total(tmp_path, capsys):
    out = tmp_path / "loader.json"
    assert _loader_bench(tmp_path, "--stages", "20", "--json", str(out)) == 0
    stages, pipeline_row = json.loads(out.read_text())
    times = stages["cpu_ms_per_sample"]
    assert stages["path"] == "stages" and stages["samples"] == 20
    assert list(times) == ["read", "decode", "crop_resize", "normalise", "tokenise", "batch"]
    assert all(ms >= 0 for ms in times.values()) and times["decode"] > 0 and times["crop_resize"] > 0
    printed = capsys.readouterr().out
    for stage, ms in times.items():  # the table shows every stage's figure, and their sum
        assert f"{stage:<13} {ms:8.3f}" in printed
    assert f"{'sum':<13} {sum(times.values()):8.3f}" in printed
    # the overall figure is the real pipeline's, as without --stages
    assert pipeline_row["path"] == "spec" and pipeline_row["samples"] == 16 and pipeline_row["cpu_s"] > 0
    assert pipeline_row["image_shape"] == [16, 16, 3]


def test_loader_bench_stages_refuse_data_they_cannot_time(capsys):
    with pytest.raises(SystemExit) as exit_info:
        data_bench.main(["--config", TINY, "--stages", "8", "--steps", "1"])
    assert exit_info.value.code == 2
    assert "--stages times prepared captioned data" in capsys.readouterr().err
