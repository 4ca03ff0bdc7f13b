"""Real object-store servers for the tests, on 127.0.0.1: `gs://` on gcp-storage-emulator, `s3://` on moto.

Each server runs in its own process (`python tests/storage_servers.py gs|s3`), started once per test process
(session scope: with xdist, once per worker) and stopped at the end; it also exits by itself when its parent
dies (it watches its stdin), so no server outlives the tests. A crash in a client (a tensorstore abort) cannot take
the server with it, and the server keeps answering while the test process is busy in JAX.

Use the fixtures (a test module enables them with `pytest_plugins = ["storage_servers"]`, or conftest.py does):

    gs_server, s3_server    session: a `StorageServer` (endpoint, bucket, env, url(), env_for_subprocess())
    gs_bucket, s3_bucket    function: a fresh `gs://mmjax-test/<unique>` / `s3://mmjax-test/<unique>` URL
                            (str, no trailing slash), with the client environment below set for the test and
                            restored after, and fsspec's cached gcsfs/s3fs instances dropped before and after

and `env_for_subprocess()` for the `mmjax` processes a test starts: the client variables of every server this
process has started, e.g. `subprocess.run(..., env=mmjax_env(**env_for_subprocess()))`.

The clients are pointed at the servers the documented way:
  gs://  STORAGE_EMULATOR_HOST (google-cloud-storage, gcsfs, so etils.epath); gcsfs also needs
         GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false and NO_GCE_CHECK=true; TENSORSTORE_GCS_HTTP_URL (tensorstore,
         so Orbax's arrays) with GOOGLE_AUTH_TOKEN_FOR_TESTING=dummy (skips tensorstore's credential search).
         EPATH_USE_TF=false keeps etils.epath on fsspec (gcsfs) even where tensorflow is installed: its
         tf.io.gfile backend does not know STORAGE_EMULATOR_HOST.
  s3://  AWS_ENDPOINT_URL (boto3, s3fs, so etils.epath), dummy AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY,
         AWS_DEFAULT_REGION=us-east-1, and AWS_CONFIG_FILE/AWS_SHARED_CREDENTIALS_FILE pointing nowhere so a
         developer's ~/.aws cannot redirect the tests. tensorstore's s3 driver ignores AWS_ENDPOINT_URL: its spec
         needs "endpoint" (see `StorageServer.tensorstore_kvstore`).

The gs:// server is gcp-storage-emulator with four GCS behaviours the stock emulator lacks (added here, in the
tests, by wrapping its request handlers); Orbax/tensorstore rely on the first two, the workdir lock on the last:
  * downloads carry the object's `x-goog-generation` (and `x-goog-metageneration`) header: without it
    tensorstore fails every read with "Malformed StorageGeneration";
  * object listings honour `startOffset` / `endOffset`: tensorstore lists key ranges that way (OCDBT, Orbax's
    directory listings), and a listing that ignores them returns keys outside the range, which can abort the
    process;
  * `objects.move` (POST .../o/SRC/moveTo/o/DST), which gcsfs (so `epath.Path.rename`) tries first: the stock
    answer, 501, is retried by gcsfs for ~30 s before it falls back to copy + delete;
  * the `ifGenerationMatch` precondition of uploads (simple and multipart) and deletes, answered 412 when it does
    not hold: the workdir lock (mmjax/training/lock_stores.py) is a compare-and-swap on the object's generation.
The wrapper touches the emulator's handler functions and its `Response` internals, so gcp-storage-emulator is
pinned to one version (setup.py's test extra); `test_storage_servers.py` checks both behaviours directly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import selectors
import subprocess
import sys
import threading
import urllib.request
import uuid

BUCKET = "mmjax-test"
_HOST = "127.0.0.1"
_READY = "STORAGE-SERVER-READY"
_STARTUP_TIMEOUT_S = 60

# The client environment of every server this process has started (scheme -> variables).
_RUNNING: dict[str, dict[str, str]] = {}
# Variables that must not leak from a developer's shell into the s3 clients.
_S3_UNSET = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
             "AWS_ENDPOINT_URL_S3", "AWS_REGION")


@dataclasses.dataclass(frozen=True)
class StorageServer:
    scheme: str  # "gs" or "s3"
    endpoint: str  # http://127.0.0.1:PORT
    bucket: str
    env: dict  # the client environment (str -> str)
    log: str  # the server's log file
    pid: int  # the server process

    def url(self, *parts: str) -> str:
        """`gs://mmjax-test/a/b` for url("a", "b")."""
        return "/".join([f"{self.scheme}://{self.bucket}", *(p.strip("/") for p in parts if p)])

    def unique_url(self, name: str = "t") -> str:
        return self.url(f"{name}-{uuid.uuid4().hex[:12]}")

    def env_for_subprocess(self) -> dict:
        return dict(self.env)

    def tensorstore_kvstore(self, path: str) -> dict:
        """A tensorstore kvstore spec for `path` (a key in the bucket) on this server."""
        if self.scheme == "gs":  # the endpoint comes from TENSORSTORE_GCS_HTTP_URL
            return {"driver": "gcs", "bucket": self.bucket, "path": path}
        return {"driver": "s3", "bucket": self.bucket, "path": path, "endpoint": self.endpoint,
                "aws_region": self.env["AWS_DEFAULT_REGION"]}


def client_env(scheme: str, endpoint: str) -> dict:
    if scheme == "gs":
        # CLOUD_STORAGE_EMULATOR_ENDPOINT: array_record's own GCS client (prepared datasets read from gs://)
        return {"STORAGE_EMULATOR_HOST": endpoint, "CLOUD_STORAGE_EMULATOR_ENDPOINT": endpoint,
                "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
                "NO_GCE_CHECK": "true", "TENSORSTORE_GCS_HTTP_URL": endpoint,
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy", "GOOGLE_CLOUD_PROJECT": "mmjax-test",
                "EPATH_USE_TF": "false"}
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "EPATH_USE_TF": "false"}


def env_for_subprocess() -> dict:
    """The client variables of every server this process has started (both schemes, when both run)."""
    env = {}
    for variables in _RUNNING.values():
        env.update(variables)
    return env


@contextlib.contextmanager
def running_server(scheme: str, log_dir: str, bucket: str = BUCKET, *, stock: bool = False):
    """Starts a server process for `scheme` ("gs" or "s3") on a free port of 127.0.0.1, with `bucket` created;
    yields its `StorageServer`; stops it (and waits for it) on exit. stock: the gs emulator without the
    test-side wrapper (only to show what the wrapper adds)."""
    os.makedirs(log_dir, exist_ok=True)
    log = os.path.join(log_dir, f"{scheme}-server-{os.getpid()}.log")
    with open(log, "ab") as log_file:
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), scheme + ("-stock" if stock else ""), bucket], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=log_file, cwd=log_dir)
    try:
        port = _wait_ready(proc, log)
        endpoint = f"http://{_HOST}:{port}"
        server = StorageServer(scheme, endpoint, bucket, client_env(scheme, endpoint), log, proc.pid)
        if not stock:
            _RUNNING[scheme] = server.env
        yield server
    finally:
        if not stock:
            _RUNNING.pop(scheme, None)
        proc.stdin.close()  # the server exits when its stdin closes
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def _wait_ready(proc: subprocess.Popen, log: str) -> int:
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if sel.select(timeout=_STARTUP_TIMEOUT_S):
            line = proc.stdout.readline().decode()
            if line.startswith(_READY):
                return int(line.split()[1])
    proc.kill()
    proc.wait()
    with open(log, errors="replace") as f:
        raise RuntimeError(f"storage server did not start; its log ({log}):\n{f.read()[-3000:]}")


# ----------------------------------------------------------------------------------------------- pytest fixtures
try:
    import pytest
except ImportError:  # the server processes do not need pytest
    pytest = None

if pytest is not None:

    @pytest.fixture(scope="session")
    def gs_server(tmp_path_factory):
        with running_server("gs", str(tmp_path_factory.getbasetemp() / "storage-servers")) as server:
            yield server

    @pytest.fixture(scope="session")
    def s3_server(tmp_path_factory):
        with running_server("s3", str(tmp_path_factory.getbasetemp() / "storage-servers")) as server:
            yield server

    def _with_env(server: StorageServer, monkeypatch):
        if server.scheme == "s3":
            for k in _S3_UNSET:
                monkeypatch.delenv(k, raising=False)
        for k, v in server.env.items():
            monkeypatch.setenv(k, v)

    def _drop_cached_filesystems():
        """fsspec caches filesystem instances (with their endpoint) per process: a test must not inherit one."""
        for module, cls in (("gcsfs", "GCSFileSystem"), ("s3fs", "S3FileSystem")):
            if module in sys.modules:
                getattr(sys.modules[module], cls).clear_instance_cache()

    @pytest.fixture
    def gs_bucket(gs_server, monkeypatch):
        _with_env(gs_server, monkeypatch)
        _drop_cached_filesystems()
        yield gs_server.unique_url()
        _drop_cached_filesystems()

    @pytest.fixture
    def s3_bucket(s3_server, monkeypatch):
        _with_env(s3_server, monkeypatch)
        _drop_cached_filesystems()
        yield s3_server.unique_url()
        _drop_cached_filesystems()


# ------------------------------------------------------------------------------------------- the server processes
def _exit_with_parent():
    """Exits this process when the parent closes our stdin (it stops us, or it died)."""
    def watch():
        sys.stdin.buffer.read()
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def _patch_gcs_emulator():
    """The two GCS behaviours Orbax needs, around the stock emulator's handlers (see the module docstring)."""
    from http import HTTPStatus

    from gcp_storage_emulator import server
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    stock_download, stock_ls = objects.download, objects.ls

    def download(request, response, storage, *args, **kwargs):
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except NotFound:
            obj = None
        stock_download(request, response, storage, *args, **kwargs)
        if obj is not None and response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))

    def ls(request, response, storage, *args, **kwargs):
        def arg(name):
            return (request.query.get(name) or [None])[0]

        start, end = arg("startOffset"), arg("endOffset")
        if start is None and end is None:
            return stock_ls(request, response, storage, *args, **kwargs)
        # GCS applies the offsets to object names, then groups by the delimiter: list without the delimiter
        # (the stock code), keep the names in [start, end), and group them here.
        prefix, delimiter = arg("prefix") or "", arg("delimiter")
        try:
            files, _ = storage.get_file_list(request.params["bucket_name"], prefix or None, None,
                                             arg("matchGlob"))
        except NotFound:
            response.status = HTTPStatus.NOT_FOUND
            return
        items, prefixes = [], set()
        for obj in files:
            name = obj["name"]
            if (start is not None and name < start) or (end is not None and name >= end):
                continue
            cut = name.find(delimiter, len(prefix)) if delimiter else -1
            if cut >= 0:
                prefixes.add(name[:cut + len(delimiter)])
            else:
                items.append(obj)
        items.sort(key=lambda o: o["name"])
        response.json({"kind": "storage#objects", "prefixes": sorted(prefixes), "items": items})

    def move(request, response, storage, *args, **kwargs):
        bucket, src, dst = (request.params[k] for k in ("bucket_name", "object_id", "dest_object_id"))
        try:  # one request at a time (the emulator's server is single-threaded): atomic, as in GCS
            obj = objects._copy(request.base_url, storage, bucket, src, bucket, dst)
        except NotFound:
            response.status = HTTPStatus.NOT_FOUND
            return
        objects._delete(storage, bucket, src)
        response.json(obj)

    def precondition_failed(request, response, storage, object_id) -> bool:
        """GCS's `ifGenerationMatch`: 0 means "only if no such object", N "only if its generation is N"; on a
        mismatch, answer 412 and return True."""
        wanted = (request.query.get("ifGenerationMatch") or [None])[0]
        if wanted is None or object_id is None:
            return False
        try:
            current = str(storage.get_file_obj(request.params["bucket_name"], object_id)["generation"])
        except NotFound:
            current = "0"
        if current == str(wanted):
            return False
        response.status = HTTPStatus.PRECONDITION_FAILED
        response.json({"error": {"code": 412, "message": "conditionNotMet: At least one of the pre-conditions "
                                                         "you specified did not hold."}})
        return True

    def insert(request, response, storage, *args, **kwargs):
        kind = (request.query.get("uploadType") or [""])[0]
        name = (request.query.get("name") or [None])[0]
        if name is None and kind == "multipart" and isinstance(request.data, dict):
            name = (request.data.get("meta") or {}).get("name")
        if not precondition_failed(request, response, storage, name):
            stock_insert(request, response, storage, *args, **kwargs)

    def delete(request, response, storage, *args, **kwargs):
        if not precondition_failed(request, response, storage, request.params["object_id"]):
            stock_delete(request, response, storage, *args, **kwargs)

    stock_insert, stock_delete = objects.insert, objects.delete
    wrapped = {stock_download: download, stock_ls: ls, stock_insert: insert, stock_delete: delete}
    objects.download, objects.ls = download, ls  # objects.get (alt=media) calls download by its global name
    move_route = (r"^/storage/v1/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/"
                  r"(?P<dest_object_id>.*[^/]+)$", {"POST": move})
    server.HANDLERS = (move_route, *((regex, {m: wrapped.get(h, h) for m, h in handlers.items()})
                                     for regex, handlers in server.HANDLERS))


def _serve_gs(bucket: str, stock: bool = False):
    import logging

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("gcp_storage_emulator.storage").setLevel(logging.CRITICAL)  # logs each 404 as an error
    if not stock:
        _patch_gcs_emulator()
    import socketserver

    stock_handle_error = socketserver.BaseServer.handle_error

    def handle_error(self, request, client_address):
        # A client gave up on a request (gcsfs's exists() cancels the half of its two requests it no longer needs):
        # not an error, and its traceback would fill the log.
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            stock_handle_error(self, request, client_address)

    socketserver.BaseServer.handle_error = handle_error
    from gcp_storage_emulator.server import create_server

    srv = create_server(_HOST, 0, in_memory=True, default_bucket=bucket)
    srv.start()
    return srv._api._httpd.server_address[1]


def _serve_s3(bucket: str):
    import logging

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    from moto.server import ThreadedMotoServer

    srv = ThreadedMotoServer(ip_address=_HOST, port=0, verbose=False)
    srv.start()
    port = srv.get_host_and_port()[1]
    req = urllib.request.Request(f"http://{_HOST}:{port}/{bucket}", method="PUT", data=b"")
    with urllib.request.urlopen(req, timeout=30) as r:  # CreateBucket in us-east-1
        r.read()
    return port


def main(argv):
    scheme, bucket = argv
    _exit_with_parent()
    port = {"gs": _serve_gs, "s3": _serve_s3, "gs-stock": lambda b: _serve_gs(b, stock=True)}[scheme](bucket)
    print(f"{_READY} {port}", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main(sys.argv[1:])
