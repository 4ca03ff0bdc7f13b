"""What reaches the object-store servers of tests/storage_servers.py, and what does not: the ground the
object-store paths of mmjax (issue 21) stand on. Each assertion here is a fact a later change relies on; one that
starts failing means a library changed its behaviour (read the test's docstring before "fixing" it).

gs:// (gcp-storage-emulator, wrapped): etils.epath / gcsfs, google-cloud-storage, tensorstore, Orbax's
CheckpointManager (async, max_to_keep, OCDBT on and off, also written by 2 processes and restored by 1), grain's
iterator checkpoints and JSON items all work.
s3:// (moto): etils.epath / s3fs, boto3 and tensorstore (endpoint in its spec) work; Orbax 0.12.8 cannot save a
checkpoint there and writes a local folder named `s3:` while failing.
"""

import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import storage_servers
from etils import epath
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from storage_servers import BUCKET, env_for_subprocess, running_server
from subprocess_env import mmjax_env

pytest_plugins = ["storage_servers"]  # the gs_server / s3_server / gs_bucket / s3_bucket fixtures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _no_local_url_folders(*dirs):
    """No client mistook a URL for a local path (`gs:/bucket/...`, `s3:/bucket/...`) in `dirs`."""
    for d in dirs:
        assert not [n for n in os.listdir(d) if n in ("gs:", "s3:")], os.listdir(d)


# --------------------------------------------------------------------------------------------------- the servers
def _listening_on_loopback_only(port: int) -> bool:
    """/proc/net/tcp{,6}: every socket listening on `port` is bound to 127.0.0.1."""
    addresses = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    addresses.append(address)
    return addresses == ["0100007F"]  # 127.0.0.1, little-endian


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie (exited, not yet reaped) is not a server
        return f.read().split(")")[-1].split()[0] != "Z"


def test_servers_start_fast_on_loopback_and_stop(tmp_path):
    t = time.monotonic()
    with running_server("gs", str(tmp_path)) as gs, running_server("s3", str(tmp_path)) as s3:
        started = time.monotonic() - t
        for server in (gs, s3):
            port = int(server.endpoint.rsplit(":", 1)[1])
            assert server.endpoint.startswith("http://127.0.0.1:") and _listening_on_loopback_only(port)
            assert _alive(server.pid)
        assert env_for_subprocess() == {**gs.env, **s3.env}
        assert gs.env["STORAGE_EMULATOR_HOST"] == gs.env["TENSORSTORE_GCS_HTTP_URL"] == gs.endpoint
        assert s3.env["AWS_ENDPOINT_URL"] == s3.endpoint
    assert not _alive(gs.pid) and not _alive(s3.pid)
    assert env_for_subprocess() == {}
    # Both together take ~2 s on an idle machine; the bound leaves room for a loaded one.
    assert started < 20, f"servers took {started:.1f} s to start"


def test_server_exits_when_its_parent_dies(tmp_path):
    """A killed test process leaves no server behind: the server exits when its stdin (from the parent) closes."""
    code = ("import os, sys; sys.path.insert(0, sys.argv[1]); from storage_servers import running_server\n"
            "cm = running_server('gs', sys.argv[2]); server = cm.__enter__()\n"
            "print(server.pid, flush=True); os._exit(0)\n")
    r = subprocess.run([sys.executable, "-c", code, os.path.join(ROOT, "tests"), str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    pid = int(r.stdout.split()[0])
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid)


def _gcs_upload(endpoint, name, data=b"x"):
    url = f"{endpoint}/upload/storage/v1/b/{BUCKET}/o?uploadType=media&name={urllib.parse.quote(name, safe='')}"
    with urllib.request.urlopen(urllib.request.Request(url, data=data, method="POST"), timeout=30) as r:
        return json.load(r)


def _gcs_list(endpoint, **query):
    with urllib.request.urlopen(f"{endpoint}/storage/v1/b/{BUCKET}/o?{urllib.parse.urlencode(query)}",
                                timeout=30) as r:
        listing = json.load(r)
    return [o["name"] for o in listing.get("items") or []], listing.get("prefixes") or []


def _gcs_download_headers(endpoint, name):
    url = f"{endpoint}/storage/v1/b/{BUCKET}/o/{urllib.parse.quote(name, safe='')}?alt=media"
    with urllib.request.urlopen(url, timeout=30) as r:
        r.read()
        return r.headers


def _wrapper_checks(endpoint, root):
    names = [f"{root}/{n}" for n in ("a/1", "a/2", "b/x/1", "b/y", "c")]
    generation = {n: _gcs_upload(endpoint, n)["generation"] for n in names}
    downloaded = _gcs_download_headers(endpoint, names[0]).get("x-goog-generation")
    in_range = _gcs_list(endpoint, prefix=f"{root}/", startOffset=f"{root}/a/2", endOffset=f"{root}/b/y")
    return generation[names[0]], downloaded, in_range


def test_emulator_wrapper_adds_what_orbax_needs(gs_server, tmp_path):
    """The wrapped emulator sends `x-goog-generation` on downloads and honours startOffset/endOffset (with and
    without a delimiter, as GCS: offsets apply to object names, then names are grouped); the stock emulator
    of the pinned version does neither. If the stock half fails, upstream has fixed it: drop that part of the
    wrapper (storage_servers._patch_gcs_emulator). (Orbax on the stock emulator fails with "Malformed
    StorageGeneration" only sometimes, when a write reads an OCDBT manifest back: too racy for a test.)"""
    root = gs_server.unique_url().split("/", 3)[3]
    generation, downloaded, in_range = _wrapper_checks(gs_server.endpoint, root)
    assert downloaded == generation
    assert in_range == ([f"{root}/a/2", f"{root}/b/x/1"], [])
    assert _gcs_list(gs_server.endpoint, prefix=f"{root}/", delimiter="/", startOffset=f"{root}/a/2",
                     endOffset=f"{root}/b/x/2") == ([], [f"{root}/a/", f"{root}/b/"])
    assert _gcs_list(gs_server.endpoint, prefix=f"{root}/", delimiter="/",
                     startOffset=f"{root}/b/y") == ([f"{root}/c"], [f"{root}/b/"])
    assert _gcs_list(gs_server.endpoint, prefix=f"{root}/", delimiter="/") == ([f"{root}/c"],
                                                                               [f"{root}/a/", f"{root}/b/"])
    with running_server("gs", str(tmp_path), stock=True) as stock:
        generation, downloaded, in_range = _wrapper_checks(stock.endpoint, root)
        assert downloaded is None
        assert len(in_range[0]) == 5  # every object, the offsets ignored


# --------------------------------------------------------------------------------------------------- the clients
@pytest.fixture(params=["gs", "s3"])
def bucket(request):
    return request.getfixturevalue(f"{request.param}_bucket")


def test_epath_on_the_bucket(bucket, tmp_path, monkeypatch):
    """etils.epath (fsspec: gcsfs / s3fs) does what mmjax's path layer needs, on both servers."""
    monkeypatch.chdir(tmp_path)
    root = epath.Path(bucket)
    assert str(root) == bucket and not root.exists()
    (root / "run" / "eval").mkdir(parents=True, exist_ok=True)
    (root / "run" / "config.json").write_text('{"a": 1}')
    (root / "run" / "eval" / "fig.png").write_bytes(b"\x89PNG\x00\x01")
    with (root / "run" / "metrics.jsonl").open("w") as f:
        f.write('{"step": 1}\n')
    assert json.loads((root / "run" / "config.json").read_text()) == {"a": 1}
    assert (root / "run" / "eval" / "fig.png").read_bytes() == b"\x89PNG\x00\x01"
    assert (root / "run").exists() and (root / "run").is_dir() and not (root / "run" / "config.json").is_dir()
    assert not (root / "run" / "missing.json").exists()
    assert sorted(p.name for p in (root / "run").iterdir()) == ["config.json", "eval", "metrics.jsonl"]
    assert sorted(p.name for p in root.glob("run/*.json*")) == ["config.json", "metrics.jsonl"]
    # A rename (Orbax finalizes a save by renaming its tmp folder) of one object, and of a "folder".
    (root / "run" / "metrics.jsonl").rename(root / "run" / "metrics-0.jsonl")
    assert sorted(p.name for p in (root / "run").iterdir()) == ["config.json", "eval", "metrics-0.jsonl"]
    with pytest.raises(NotImplementedError, match="Recursive"):  # epath refuses `**` on URLs: list level by level
        list(root.rglob("*"))
    (root / "run" / "config.json").unlink()
    (root / "run").rmtree()
    assert not (root / "run").exists()
    _no_local_url_folders(tmp_path)


def test_other_clients_reach_the_servers(gs_bucket, s3_server, monkeypatch):
    """google-cloud-storage, gcsfs and tensorstore on gs://; boto3, s3fs and tensorstore (endpoint in the spec)
    on s3://, all with the fixtures' environment (gs_bucket sets the gs variables; the s3 ones are set here)."""
    import boto3
    import gcsfs
    import s3fs
    import tensorstore as ts
    from google.cloud import storage

    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    gs_key = gs_bucket.split("/", 3)[3]
    client = storage.Client()
    client.bucket(BUCKET).blob(f"{gs_key}/a").upload_from_string(b"gcs")
    assert gcsfs.GCSFileSystem().cat(f"{BUCKET}/{gs_key}/a") == b"gcs"
    s3_key = s3_server.unique_url().split("/", 3)[3]
    boto3.client("s3").put_object(Bucket=BUCKET, Key=f"{s3_key}/a", Body=b"s3")
    assert s3fs.S3FileSystem().cat(f"{BUCKET}/{s3_key}/a") == b"s3"
    for spec in (storage_servers.StorageServer.tensorstore_kvstore(s3_server, f"{s3_key}/ts/"),
                 {"driver": "gcs", "bucket": BUCKET, "path": f"{gs_key}/ts/"}):  # gcs: TENSORSTORE_GCS_HTTP_URL
        kv = ts.KvStore.open(spec).result()
        for key in ("a", "b/c", "d"):
            kv.write(key, key.encode()).result()
        assert kv.read("b/c").result().value == b"b/c"
        assert sorted(kv.list().result()) == [b"a", b"b/c", b"d"]
        assert kv.list(ts.KvStore.KeyRange("b", "d")).result() == [b"b/c"]  # a key range: startOffset/endOffset
    assert [b.name for b in client.list_blobs(BUCKET, prefix=f"{gs_key}/ts/")] == [
        f"{gs_key}/ts/{k}" for k in ("a", "b/c", "d")]


# ----------------------------------------------------------------------------------------------------- Orbax
def _tree(scale=1.0):
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    return {"w": jax.device_put(jnp.arange(128.0).reshape(16, 8) * scale, NamedSharding(mesh, P("data", "model"))),
            "b": jax.device_put(jnp.ones(8) * scale, NamedSharding(mesh, P())),
            "step": 7}


def _abstract(tree):
    import orbax.checkpoint as ocp

    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _restore(directory, step, tree, ocdbt):
    import orbax.checkpoint as ocp

    abstract = _abstract(tree)
    with ocp.CheckpointManager(directory, item_handlers=ocp.PyTreeCheckpointHandler(use_ocdbt=ocdbt)) as m:
        steps = m.all_steps()
        restored = m.restore(step, args=ocp.args.PyTreeRestore(
            abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)))
    return steps, restored


@pytest.mark.parametrize("ocdbt", [True, False], ids=["ocdbt", "no-ocdbt"])
def test_orbax_checkpoint_manager_on_gs(gs_bucket, ocdbt, tmp_path, monkeypatch):
    """Orbax 0.12.8 saves (async, max_to_keep=2) a sharded pytree to gs:// on the wrapped emulator, and a new
    manager restores it with the same shardings; all in the bucket, nothing local."""
    import orbax.checkpoint as ocp

    monkeypatch.chdir(tmp_path)
    directory = f"{gs_bucket}/checkpoints"
    options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=True)
    with ocp.CheckpointManager(directory, options=options,
                               item_handlers=ocp.PyTreeCheckpointHandler(use_ocdbt=ocdbt)) as m:
        for step in (1, 2, 3):
            assert m.save(step, args=ocp.args.PyTreeSave(_tree(step)))
        m.wait_until_finished()
        assert m.all_steps() == [2, 3]
    steps, restored = _restore(directory, 3, _tree(), ocdbt)
    assert steps == [2, 3]
    expected = _tree(3)
    for k in ("w", "b"):
        np.testing.assert_array_equal(restored[k], expected[k])
        assert restored[k].sharding == expected[k].sharding
    assert restored["step"] == 7
    names = sorted(p.name for p in (epath.Path(directory) / "3" / "default").iterdir())
    assert ("ocdbt.process_0" in names) == ocdbt and ("manifest.ocdbt" in names) == ocdbt
    assert ("w" in names) != ocdbt  # without OCDBT, one zarr folder per array
    _no_local_url_folders(tmp_path)


def test_grain_iterator_and_json_items_on_gs(gs_bucket, tmp_path, monkeypatch):
    """grain's Orbax handler (per-process iterator state, process_0-of-1.json) and JSON items, in one composite
    checkpoint on gs://; the restored iterator continues where the saved one stopped."""
    import grain
    import grain.checkpoint
    import orbax.checkpoint as ocp

    monkeypatch.chdir(tmp_path)

    def iterator():
        return iter(grain.MapDataset.range(50).shuffle(seed=3).to_iter_dataset())

    it = iterator()
    seen = [next(it) for _ in range(5)]
    handlers = {"data": grain.checkpoint.CheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    directory = f"{gs_bucket}/checkpoints"
    with ocp.CheckpointManager(directory, item_handlers=handlers) as m:
        m.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it),
                                          meta=ocp.args.JsonSave({"step": 5, "seen": [int(x) for x in seen]})))
        m.wait_until_finished()
    expected = [next(it) for _ in range(5)]
    with ocp.CheckpointManager(directory, item_handlers=handlers) as m:
        restored = m.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(iterator()),
                                                        meta=ocp.args.JsonRestore()))
    assert restored["meta"] == {"step": 5, "seen": [int(x) for x in seen]}
    assert [next(restored["data"]) for _ in range(5)] == expected
    assert [p.name for p in (epath.Path(directory) / "5" / "data").glob("process_*")] == ["process_0-of-1.json"]
    _no_local_url_folders(tmp_path)


@pytest.mark.parametrize("ocdbt", [True, False], ids=["ocdbt", "no-ocdbt"])
@pytest.mark.parametrize("async_save", [True, False], ids=["async", "sync"])
def test_orbax_cannot_checkpoint_to_s3(s3_bucket, ocdbt, async_save, tmp_path, monkeypatch):
    """Orbax 0.12.8 has no s3 path for arrays: its tensorstore specs take `s3://b/k` for a local path, and
    `s3:/b/k` (one slash) lands under the working directory. With OCDBT the array write refuses ("Checkpoint path
    should be absolute"); without it the arrays are written to the local `s3:` folder and the finalising rename on
    the bucket then fails (FileNotFoundError from s3fs). Both ways a local folder named `s3:` is left behind and
    no checkpoint step exists on the bucket. An async save reports the error at wait_until_finished, a sync save
    at save. So mmjax must refuse an s3:// checkpoint directory before anything runs."""
    import orbax.checkpoint as ocp

    monkeypatch.chdir(tmp_path)
    directory = f"{s3_bucket}/checkpoints"
    expected = (ValueError, "Checkpoint path should be absolute") if ocdbt else (FileNotFoundError, "key does not")
    m = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(enable_async_checkpointing=async_save),
                              item_handlers=ocp.PyTreeCheckpointHandler(use_ocdbt=ocdbt))
    with pytest.raises(expected[0], match=expected[1]):
        if async_save:
            assert m.save(1, args=ocp.args.PyTreeSave(_tree()))
            m.wait_until_finished()
        else:
            m.save(1, args=ocp.args.PyTreeSave(_tree()))
    try:
        m.close()
    except Exception:  # noqa: BLE001  (the failed save may be reported again)
        pass
    local = tmp_path / "s3:" / BUCKET / s3_bucket.split("/", 3)[3] / "checkpoints"
    written = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    assert "1.orbax-checkpoint-tmp/default.orbax-checkpoint-tmp/_sharding" in written
    arrays = [w for w in written if "/w/" in w]  # zarr chunks of the array "w"
    assert bool(arrays) != ocdbt, written
    assert "1" not in [p.name for p in epath.Path(directory).iterdir()]


# ------------------------------------------------------------------------------------------ 2 processes -> 1
_TWO_PROCESS_SAVE = """
import os, sys
import jax, numpy as np
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(os.environ["MMJAX_COORDINATOR"], int(os.environ["MMJAX_NUM_PROCESSES"]),
                           int(os.environ["MMJAX_PROCESS_ID"]))
import grain, grain.checkpoint
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

directory = sys.argv[1]
assert jax.process_count() == 2 and jax.device_count() == 8
mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
full = np.arange(128.0, dtype=np.float32).reshape(16, 8)
state = {"w": jax.make_array_from_callback(full.shape, NamedSharding(mesh, P("data", "model")), lambda i: full[i]),
         "b": jax.make_array_from_callback((8,), NamedSharding(mesh, P()), lambda i: np.ones(8, np.float32)[i])}
it = iter(grain.MapDataset.range(40).shuffle(seed=jax.process_index()).to_iter_dataset())
[next(it) for _ in range(3)]
handlers = {"state": ocp.PyTreeCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()}
with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(max_to_keep=2),
                           item_handlers=handlers) as m:
    m.save(4, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state), data=grain.checkpoint.CheckpointSave(it)))
    m.wait_until_finished()
print("saved", jax.process_index(), flush=True)
"""


def test_two_processes_save_one_restores_on_gs(gs_bucket, tmp_path, monkeypatch):
    """launch/local.sh starts 2 processes x 4 CPU devices (jax.distributed, gloo); they save one OCDBT checkpoint
    (async, the arrays sharded across both processes, each process's grain iterator state) to the emulated
    bucket; this 1-process, 8-device run restores it."""
    import orbax.checkpoint as ocp

    monkeypatch.chdir(tmp_path)
    script = tmp_path / "save.py"
    script.write_text(_TWO_PROCESS_SAVE)
    directory = f"{gs_bucket}/checkpoints"
    env = mmjax_env(MMJAX_LOG_DIR=str(tmp_path / "logs"), **env_for_subprocess())
    r = subprocess.run(["bash", os.path.join(ROOT, "launch", "local.sh"), "2", "4", sys.executable, str(script),
                        directory], env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    ck = epath.Path(directory) / "4"
    assert sorted(p.name for p in (ck / "data").glob("process_*")) == ["process_0-of-2.json", "process_1-of-2.json"]
    assert "manifest.ocdbt" in [p.name for p in (ck / "state").iterdir()]
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    abstract = {"w": jax.ShapeDtypeStruct((16, 8), jnp.float32, sharding=NamedSharding(mesh, P("data", "model"))),
                "b": jax.ShapeDtypeStruct((8,), jnp.float32, sharding=NamedSharding(mesh, P()))}
    with ocp.CheckpointManager(directory, item_handlers={"state": ocp.PyTreeCheckpointHandler()}) as m:
        assert m.all_steps() == [4]
        state = m.restore(4, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))))["state"]
    np.testing.assert_array_equal(state["w"], np.arange(128.0, dtype=np.float32).reshape(16, 8))
    np.testing.assert_array_equal(state["b"], np.ones(8, np.float32))
    assert state["w"].sharding == abstract["w"].sharding
    _no_local_url_folders(tmp_path)
