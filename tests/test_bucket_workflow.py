"""The pod path on real object-store servers (tests/storage_servers.py, on 127.0.0.1), as docs/pods.md tells it.

gs://: the tiny config trains with its workdir and its data (tar shards streamed with data.name='wds_stream', and
their spec) on the bucket, is SIGKILLed, resumes from the bucket bit-identically to an uninterrupted run, is
evaluated by `mmjax eval` and loaded by `mmjax.load`, all from the bucket; a 2-process run (launch/local.sh)
writes a checkpoint there that a 1-process run restores. s3://: data, specs and logs work; checkpoints are refused
with one line (Orbax has no S3 storage). Nothing ever creates a local folder named `gs:` or `s3:`."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from subprocess_env import ROOT, mmjax_env
from test_stream import write_corpus

import mmjax
from mmjax import cli, storage
from mmjax.training import loop
from mmjax.training.metrics import MetricsWriter, read_metrics

pytest_plugins = ["storage_servers"]
TINY = os.path.join(ROOT, "tests", "tiny_config.py")


def upload_folder(local, url):
    for name in sorted(os.listdir(local)):
        storage.write_bytes_atomic(storage.join(url, name), (local / name).read_bytes())


def no_url_folders(*folders):
    for folder in (ROOT, os.getcwd(), *folders):
        assert not [n for n in os.listdir(folder) if n in ("gs:", "s3:")], folder


def stream_args(spec_url, steps):
    return ["--config", TINY, "--quiet", "--config.data.name=wds_stream", f"--config.data.spec={spec_url}",
            "--config.data.shuffle_buffer=16", "--config.data.open_shards=2", "--config.model.text.max_len=48",
            "--config.train.batch_size=8", f"--config.train.steps={steps}", "--config.checkpoint.every_steps=2",
            "--config.checkpoint.async_save=false"]


def params_of(workdir):
    return jax.tree.leaves(mmjax.load(workdir).params)


def wait_for_checkpoint(directory, step, proc, timeout=300):
    """Waits until checkpoint `step` is complete on the bucket (Orbax's commit_success.txt on gs://)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if storage.exists(storage.join(directory, str(step), "commit_success.txt")):
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.5)
    raise AssertionError(f"checkpoint {step} did not appear in {directory}")


@pytest.mark.slow
def test_train_kill_resume_eval_load_all_on_gs(gs_bucket, gs_server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = storage.join(gs_bucket, "shards")
    upload_folder(write_corpus(tmp_path / "corpus"), data)
    spec = storage.join(data, "spec.json")
    reference, run = storage.join(gs_bucket, "reference"), storage.join(gs_bucket, "run")
    # The three runs compared bit for bit run alike: each an `mmjax train` process of its own.
    train = [sys.executable, "-m", "mmjax", "train", "--workdir"]
    env = mmjax_env(devices=jax.device_count(), **gs_server.env_for_subprocess())

    def train_to_the_end(workdir) -> str:
        done = subprocess.run([*train, workdir, *stream_args(spec, 6)], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout + done.stderr

    train_to_the_end(reference)

    # The same run, SIGKILLed after its checkpoint 2 is on the bucket, then resumed from the bucket.
    proc = subprocess.Popen([*train, run, *stream_args(spec, 6)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_checkpoint(storage.join(run, "checkpoints"), 2, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    before = read_metrics(run)
    assert [r["step"] for r in before][:2] == [1, 2]
    # The lock of the killed run (same machine, its pid gone) is taken over at once.
    assert "taking over the lock" in train_to_the_end(run)
    for a, b in zip(params_of(reference), params_of(run), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The metrics of both runs of the workdir read as one stream, none lost: the killed run's records, then the
    # resumed run's (from its checkpoint's step on).
    records = read_metrics(run)
    assert records[:len(before)] == before and records[-1]["step"] == 6
    assert {r["step"] for r in records} == set(range(1, 7))
    assert storage.glob(storage.join(run, "tensorboard", "events.out.tfevents.*"))
    assert json.loads(storage.read_text(storage.join(run, "config.json")))["data"]["spec"] == spec
    assert not storage.exists(storage.join(run, "lock.json"))  # released at the end

    # mmjax eval reads the checkpoints from the bucket and writes its results and figures there.
    assert cli.main(["eval", "--config", TINY, "--workdir", run, "--quiet", "--config.eval.batch_size=64"]) == 0
    results = json.loads(storage.read_text(storage.join(run, "eval", "6.json")))
    assert results["step"] == 6 and 0 <= results["retrieval/i2t/r1"] <= 1
    assert storage.exists(storage.join(run, "eval", "curves.png"))
    model = mmjax.load(run)
    assert model.step == 6
    # A workdir written by another config is refused, on a bucket as on a disk, and keeps its checkpoints.
    assert cli.main(["train", "--workdir", run, *stream_args(spec, 8), "--config.model.embed_dim=32"]) == 2
    assert sorted(int(s) for s in storage.listdir(storage.join(run, "checkpoints")) if s.isdigit())[-1] == 6
    assert model.encode_text(["a photo of the number three"]).shape == (1, 16)
    # init_from reads the parameters of a bucket workdir into a new (local) run.
    assert cli.main(["train", "--workdir", str(tmp_path / "ft"), *stream_args(spec, 2),
                     f"--config.init_from.path={run}"]) == 0
    no_url_folders(tmp_path)


@pytest.mark.slow
def test_two_processes_write_one_checkpoint_to_gs_that_one_process_restores(gs_bucket, gs_server, tmp_path):
    workdir = storage.join(gs_bucket, "multi")
    args = ["-m", "mmjax", "train", "--config", TINY, "--workdir", workdir, "--quiet",
            f"--config.data.data_dir={tmp_path / 'tfds'}", "--config.train.steps=4", "--config.mesh.data=-1",
            "--config.mesh.fsdp=2"]
    env = mmjax_env(devices=8, **gs_server.env_for_subprocess())
    r = subprocess.run([sys.executable, *args, "--stop-at-step=0"], env=env, cwd=tmp_path, capture_output=True,
                       text=True, timeout=600)  # builds the dataset once, before two processes read it
    assert r.returncode == 0, r.stderr[-3000:]
    env = mmjax_env(MMJAX_LOG_DIR=str(tmp_path / "logs"), **gs_server.env_for_subprocess())
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    r = subprocess.run(["bash", os.path.join(ROOT, "launch", "local.sh"), "2", "4", sys.executable, *args,
                        "--stop-at-step=2"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    data = [n for n in storage.listdir(storage.join(workdir, "checkpoints", "2", "data")) if n.endswith(".json")]
    assert data == ["process_0-of-2.json", "process_1-of-2.json"]  # both processes wrote to the shared path
    assert [m["step"] for m in read_metrics(workdir)] == [1, 2]  # only process 0 writes logs
    env = mmjax_env(devices=8, **gs_server.env_for_subprocess())
    r = subprocess.run([sys.executable, *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [m["step"] for m in read_metrics(workdir)] == [1, 2, 3, 4]  # both runs' parts, one stream
    no_url_folders(tmp_path)


def test_s3_keeps_data_and_logs_and_refuses_checkpoints_in_one_line(s3_bucket, s3_server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # Checkpoints: refused before anything runs, as one line, exit 2, nothing written anywhere.
    r = subprocess.run([sys.executable, "-m", "mmjax", "train", "--config", TINY, "--workdir",
                        storage.join(s3_bucket, "run")], cwd=tmp_path, capture_output=True, text=True,
                       env=mmjax_env(**s3_server.env_for_subprocess()), timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("mmjax: error: checkpoints cannot go to s3://")
    assert "Orbax" in r.stderr and "gs://" in r.stderr
    assert storage.listdir(storage.join(s3_bucket, "run")) == []
    # Logs: metrics (part files, one stream), TensorBoard events, config.json.
    logs = storage.join(s3_bucket, "logs")
    writer = MetricsWriter(logs)
    for step in range(1, 4):
        writer.write(step, {"loss": 1.0 / step})
    writer.close()
    writer = MetricsWriter(logs)  # a second run of the workdir: a new part, the first kept
    writer.write(4, {"loss": 0.25})
    writer.close()
    assert [r["step"] for r in read_metrics(logs)] == [1, 2, 3, 4]
    assert storage.listdir(storage.join(logs, "metrics")) == ["part-00000.jsonl", "part-00001.jsonl"]
    assert len(storage.glob(storage.join(logs, "tensorboard", "events.out.tfevents.*"))) == 2
    loop.write_config_json(logs, {"a": 1})
    assert json.loads(storage.read_text(storage.join(logs, "config.json"))) == {"a": 1}
    no_url_folders(tmp_path)


@pytest.mark.slow
def test_s3_data_trains_a_local_workdir(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = storage.join(s3_bucket, "shards")
    upload_folder(write_corpus(tmp_path / "corpus", shards=4), data)
    workdir = tmp_path / "run"
    assert cli.main(["train", "--workdir", str(workdir), *stream_args(storage.join(data, "spec.json"), 2)]) == 0
    assert [r["step"] for r in read_metrics(str(workdir))] == [1, 2]
    no_url_folders(tmp_path)


def test_metrics_parts_rotate_and_keep_every_record(gs_bucket, monkeypatch):
    from mmjax.training import metrics

    monkeypatch.setattr(metrics, "PART_BYTES", 300)
    writer = MetricsWriter(gs_bucket)
    for step in range(1, 21):
        writer.write(step, {"loss": float(step), "lr": 0.1})
    writer.close()
    parts = storage.listdir(storage.join(gs_bucket, "metrics"))
    assert len(parts) >= 3  # rotated: no upload grows past PART_BYTES
    assert all(storage.size(storage.join(gs_bucket, "metrics", p)) <= 300 for p in parts)
    assert [r["step"] for r in read_metrics(gs_bucket)] == list(range(1, 21))


def test_unreachable_bucket_is_one_line_before_anything_compiles(gs_server, tmp_path):
    r = subprocess.run([sys.executable, "-m", "mmjax", "train", "--config", TINY, "--workdir",
                        "gs://no-such-bucket-mmjax/run"], cwd=tmp_path, capture_output=True, text=True,
                       env=mmjax_env(**gs_server.env_for_subprocess()), timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("mmjax: error: cannot reach the workdir gs://no-such-bucket-mmjax/run")
    assert "no such bucket" in last
    r = subprocess.run([sys.executable, "-m", "mmjax", "train", "--config", TINY, "--workdir", "gs:/bucket/run"],
                       cwd=tmp_path, capture_output=True, text=True, env=mmjax_env(), timeout=300)
    assert r.returncode == 2 and "looks like a mistyped URL" in r.stderr.strip().splitlines()[-1]
    no_url_folders(tmp_path)
