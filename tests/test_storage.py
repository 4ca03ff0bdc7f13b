"""The path layer (mmjax/storage.py): the same operations on a local folder, a gs:// bucket and an s3:// bucket
(servers on 127.0.0.1), listings that see what another process wrote, and one-line refusals of paths that would
land in the wrong place."""

import subprocess
import sys

import pytest
from subprocess_env import mmjax_env

from mmjax import storage
from mmjax.errors import StorageError

pytest_plugins = ["storage_servers"]


@pytest.fixture(params=["local", "gs", "s3"])
def root(request, tmp_path):
    return str(tmp_path / "root") if request.param == "local" else request.getfixturevalue(f"{request.param}_bucket")


def test_every_operation_on_every_kind_of_path(root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage.makedirs(storage.join(root, "a", "d"))
    p = storage.join(root, "a", "b.txt")
    storage.write_text_atomic(p, "hi")
    storage.write_text_atomic(storage.join(root, "a", "d", "e.txt"), "x")
    assert storage.read_text(p) == "hi" and storage.exists(p) and storage.isfile(p)
    assert storage.isdir(storage.join(root, "a")) and not storage.isfile(storage.join(root, "a"))
    assert storage.glob(storage.join(root, "a", "*.txt")) == [p]
    assert storage.listdir(storage.join(root, "a")) == ["b.txt", "d"]
    assert storage.listdir(storage.join(root, "nope")) == [] and not storage.exists(storage.join(root, "nope"))
    assert storage.size(p) == 2 and storage.name(p) == "b.txt" and storage.parent(p) == storage.join(root, "a")
    storage.rename(storage.join(root, "a"), storage.join(root, "c", "a"))  # a folder, into a new one
    assert storage.listdir(storage.join(root, "c", "a")) == ["b.txt", "d"] and not storage.exists(p)
    assert storage.read_text(storage.join(root, "c", "a", "d", "e.txt")) == "x"
    with storage.open_file(storage.join(root, "f.bin"), "wb") as f:
        f.write(b"xyz")
    with storage.open_file(storage.join(root, "f.bin"), "rb") as f:
        assert f.read() == b"xyz"
    storage.remove(storage.join(root, "f.bin"))
    storage.remove(storage.join(root, "f.bin"))  # a missing file is not an error
    storage.rmtree(storage.join(root, "c"))
    assert storage.listdir(root) == []
    assert not [n for n in (tmp_path.iterdir()) if n.name in ("gs:", "s3:")]


def test_listings_see_what_another_process_wrote(gs_bucket, gs_server):
    folder = storage.join(gs_bucket, "parts")
    storage.write_text_atomic(storage.join(folder, "0"), "a")
    assert storage.listdir(folder) == ["0"]
    code = f"from mmjax import storage; storage.write_text_atomic({storage.join(folder, '1')!r}, 'bb')"
    subprocess.run([sys.executable, "-c", code], env=mmjax_env(**gs_server.env_for_subprocess()), check=True,
                   timeout=120)
    assert storage.listdir(folder) == ["0", "1"] and storage.glob(storage.join(folder, "*"))[-1].endswith("/1")
    storage.write_text_atomic(storage.join(folder, "0"), "a longer text")  # rewritten: its new size is read
    assert storage.read_text(storage.join(folder, "0")) == "a longer text"


def test_paths_that_would_go_to_the_wrong_place_are_refused(gs_bucket):
    with pytest.raises(storage.PathError, match="looks like a mistyped URL"):
        storage.write_text_atomic("gs:/bucket/x", "a")
    with pytest.raises(storage.PathError, match="unsupported storage URL"):
        storage.read_text("hdfs://namenode/x")
    with pytest.raises(storage.PathError, match="data.data_dir: gs://b/x is an object-store URL"):
        storage.check_local("gs://b/x", "data.data_dir", "it must be local")
    with pytest.raises(StorageError, match=r"cannot reach the workdir gs://no-such-bucket-x/r: .*no such bucket"):
        storage.reachable("gs://no-such-bucket-x/r", "workdir")
