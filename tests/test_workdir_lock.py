"""One run per workdir (mmjax/training/lock.py): a second `mmjax train` on a workdir in use exits 2 before compiling
and leaves the first untouched (bit-identical to a solo run); stale locks (a killed process, a lapsed heartbeat on
another host) are taken over with a message; --force-unlock takes over any lock; the lock is released however the
run ends, only by its owner; process 0 holds it for every process of a multi-process run."""

import dataclasses
import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from subprocess_env import mmjax_env
from test_config import TINY, tiny

import mmjax
from mmjax import config as config_lib
from mmjax.data import pipeline
from mmjax.training import lock as lock_lib
from mmjax.training.lock import (
    Holder,
    RunLock,
    WorkdirLockedError,
    WorkdirLockError,
    WorkdirLockLostError,
)
from mmjax.training.loop import train
from mmjax.training.metrics import read_metrics

pytest_plugins = ["storage_servers"]  # gs_bucket / s3_bucket: the lock on object stores
ROOT = os.path.dirname(os.path.dirname(__file__))
IN_USE = re.compile(r"mmjax: error: workdir (\S+) is in use by host (\S+) pid (\d+) since [^;]+; stop it or pass "
                    r"--force-unlock after checking")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def _lock(workdir, messages=None, **kwargs):
    log = (messages.append if messages is not None else print)
    return lock_lib.WorkdirLock(lock_lib.open_store(str(workdir)), str(workdir), log=log, **kwargs)


def _write_holder(workdir, **fields):
    """Writes a lock of another run (whole, as a run does: a running heartbeat may read it at any moment)."""
    holder = dataclasses.replace(Holder.me("someone-else", time.time()), **fields)
    (workdir / "lock.json.tmp").write_bytes(holder.to_bytes())
    os.replace(workdir / "lock.json.tmp", workdir / "lock.json")
    return holder


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# --- the lock itself -------------------------------------------------------------------------------------------


def test_a_held_lock_is_refused_with_its_holder_and_freed_by_release(tmp_path):
    first = _lock(tmp_path)
    first.acquire()
    saved = json.loads((tmp_path / "lock.json").read_text())
    assert saved["pid"] == os.getpid() and saved["host"] == socket.gethostname()
    assert saved["run_id"] == first.run_id and abs(saved["heartbeat"] - time.time()) < 60
    with pytest.raises(WorkdirLockedError) as e:
        _lock(tmp_path).acquire()
    assert IN_USE.match(f"mmjax: error: {e.value}"), str(e.value)
    assert f"pid {os.getpid()} since" in str(e.value)
    assert first.release()
    assert not (tmp_path / "lock.json").exists()
    second = _lock(tmp_path)
    second.acquire()
    assert second.release()


def test_lock_of_a_dead_process_on_this_machine_is_taken_over(tmp_path):
    dead = _write_holder(tmp_path, pid=_dead_pid(), pid_start="", heartbeat=time.time())
    messages = []
    taker = _lock(tmp_path, messages)
    taker.acquire()
    assert messages == [f"mmjax: taking over the lock of host {dead.host} pid {dead.pid}, last seen 0 s ago "
                        f"(its process is gone)"]
    assert json.loads((tmp_path / "lock.json").read_text())["run_id"] == taker.run_id
    # A live pid that is now another process (pid reuse: another start time) is gone too.
    _write_holder(tmp_path, pid=os.getpid(), pid_start="1")
    _lock(tmp_path, messages).acquire()
    assert "(its process is gone)" in messages[-1]


def test_lock_of_another_host_is_taken_over_only_once_its_heartbeat_is_stale(tmp_path):
    _write_holder(tmp_path, host="elsewhere", machine="other", pid=123, heartbeat=time.time() - 5)
    with pytest.raises(WorkdirLockedError, match="in use by host elsewhere pid 123 since"):
        _lock(tmp_path).acquire()
    _write_holder(tmp_path, host="elsewhere", machine="other", pid=123, heartbeat=time.time() - 3600)
    messages = []
    _lock(tmp_path, messages).acquire()
    assert messages == ["mmjax: taking over the lock of host elsewhere pid 123, last seen 1h00m ago (its "
                        "heartbeat is older than 60 s)"]


def test_force_unlock_takes_over_a_live_lock_and_the_loser_notices(tmp_path):
    owner, messages = _lock(tmp_path), []
    owner.acquire()
    forcer = _lock(tmp_path, messages)
    forcer.acquire(force=True)
    assert messages[0].startswith(f"mmjax: warning: --force-unlock: taking over the lock of host "
                                  f"{socket.gethostname()} pid {os.getpid()}, last seen 0 s ago")
    assert not owner.refresh() and owner.lost == f"host {socket.gethostname()} pid {os.getpid()}"
    with pytest.raises(WorkdirLockLostError, match=f"pid {os.getpid()}"):
        RunLock(str(tmp_path), owner).check()
    assert not owner.release()  # not ours any more: left as it is
    assert json.loads((tmp_path / "lock.json").read_text())["run_id"] == forcer.run_id
    assert forcer.release()


def test_heartbeat_thread_refreshes_the_lock_until_released(tmp_path):
    held = _lock(tmp_path, heartbeat_seconds=0.05)
    held.acquire()
    first = json.loads((tmp_path / "lock.json").read_text())["heartbeat"]
    held.start()
    deadline = time.time() + 30
    while json.loads((tmp_path / "lock.json").read_text())["heartbeat"] == first and time.time() < deadline:
        time.sleep(0.05)
    assert json.loads((tmp_path / "lock.json").read_text())["heartbeat"] > first
    RunLock(str(tmp_path), held).check()  # still ours
    assert held.release()
    assert not (tmp_path / "lock.json").exists()
    assert not [p for p in os.listdir(tmp_path) if ".tmp." in p]


def test_file_systems_without_hard_links_create_the_lock_exclusively(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted", src)

    monkeypatch.setattr(os, "link", no_links)
    first = _lock(tmp_path)
    first.acquire()
    assert json.loads((tmp_path / "lock.json").read_text())["run_id"] == first.run_id
    with pytest.raises(WorkdirLockedError):
        _lock(tmp_path).acquire()
    assert first.release()
    assert sorted(os.listdir(tmp_path)) == ["lock.json.guard"]


@pytest.mark.parametrize("stale", [False, True], ids=["fresh", "stale"])
def test_racing_runs_never_both_win(tmp_path, stale):
    if stale:
        _write_holder(tmp_path, host="elsewhere", machine="other", heartbeat=time.time() - 3600)
    contenders = [_lock(tmp_path, []) for _ in range(8)]
    results = [None] * len(contenders)
    barrier = threading.Barrier(len(contenders))

    def contend(i):
        barrier.wait()
        try:
            contenders[i].acquire()
            results[i] = True
        except WorkdirLockedError:
            results[i] = False

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(len(contenders))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 1, results
    winner = contenders[results.index(True)]
    assert json.loads((tmp_path / "lock.json").read_text())["run_id"] == winner.run_id


def test_an_unreadable_lock_is_refused_until_stale(tmp_path):
    (tmp_path / "lock.json").write_text('{"host": "tor')
    with pytest.raises(WorkdirLockedError, match=r"is in use: its lock \S+ cannot be read \(written 0 s ago;"):
        _lock(tmp_path).acquire()
    os.utime(tmp_path / "lock.json", (time.time() - 3600, time.time() - 3600))
    messages = []
    _lock(tmp_path, messages).acquire()
    assert messages == ["mmjax: taking over an unreadable lock, last seen 1h00m ago (its heartbeat is older than 60 s)"]


def test_hold_releases_after_an_error_and_reports_storage_faults(tmp_path, monkeypatch):
    with pytest.raises(ZeroDivisionError):
        with lock_lib.hold(str(tmp_path)) as held:
            assert held.lock is not None and (tmp_path / "lock.json").exists()
            _ = 1 / 0
    assert not (tmp_path / "lock.json").exists()
    def full_disk(self, data):
        raise OSError(errno.ENOSPC, "No space left on device", self.location + ".tmp")

    monkeypatch.setattr(lock_lib.LocalLockStore, "_temporary", full_disk)
    with pytest.raises(WorkdirLockError, match=r"cannot lock the workdir: cannot write \S+lock.json.tmp: No space left on device; the disk is full") as e:
        with lock_lib.hold(str(tmp_path)):
            pass
    assert e.value.exit_code == 1 and not (tmp_path / "lock.json").exists()


_TWO_PROCESSES = """
import os, sys
from mmjax.errors import MmjaxError
from mmjax.runtime import distributed
from mmjax.training import lock
distributed.initialize()
try:
    with lock.hold(sys.argv[1]) as held:
        print("held", held.lock is not None, os.path.exists(os.path.join(sys.argv[1], "lock.json")), flush=True)
        distributed.any_process(False)  # both have looked before process 0 releases the lock
except MmjaxError as e:
    print("error", type(e).__name__, e, flush=True)
"""


def _two_processes(workdir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESSES, str(workdir)], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env=mmjax_env(1, MMJAX_COORDINATOR=f"127.0.0.1:{port}", MMJAX_NUM_PROCESSES="2",
                                            MMJAX_PROCESS_ID=str(i)))
             for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    return [[line for line in out.splitlines() if line.startswith(("held", "error"))] for out in outs]


def test_multi_process_run_agrees_on_process_0s_lock(tmp_path):
    """Process 0 holds the lock for the run; when it cannot, every process gets the same error."""
    assert _two_processes(tmp_path) == [["held True True"], ["held False True"]]
    assert not (tmp_path / "lock.json").exists()
    other = _lock(tmp_path)
    other.acquire()
    try:
        results = _two_processes(tmp_path)
    finally:
        other.release()
    assert results[0] == results[1] and len(results[0]) == 1, results
    assert results[0][0].startswith("error WorkdirLockedError workdir ") and f"pid {os.getpid()} since" in \
        results[0][0]


# --- the lock in training ----------------------------------------------------------------------------------------


def test_lock_is_released_after_a_training_error(tmp_path, data_dir, monkeypatch):
    def broken_loader(*args, **kwargs):
        raise OSError("the data went away")

    monkeypatch.setattr(pipeline, "make_train_loader", broken_loader)
    config = config_lib.apply_overrides(tiny(), [f"config.data.data_dir={data_dir}"])
    with pytest.raises(OSError, match="the data went away"):
        train(config, str(tmp_path), verbose=False)
    assert not (tmp_path / "lock.json").exists()


class _TakenOverAtStep3:
    """The train iterator; before the 3rd batch another run takes the workdir's lock over."""

    def __init__(self, it, workdir):
        self.it, self.workdir, self.n = it, workdir, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.n += 1
        if self.n == 3:  # a run on another host takes the lock over, as runs do: a compare-and-swap
            store = lock_lib.open_store(str(self.workdir))
            other = dataclasses.replace(Holder.me("the-other-run", time.time()), host="elsewhere", machine="", pid=77)
            while store.replace(other.to_bytes(), store.read()[1]) is None:
                pass  # our heartbeat changed it between the read and the write: read again
            deadline = time.time() + 120  # the heartbeat thread (every 0.05 s here) notices, and ends
            while any(t.name == "mmjax-workdir-lock" for t in threading.enumerate()) and time.time() < deadline:
                time.sleep(0.01)
        return next(self.it)

    def __getattr__(self, name):
        return getattr(self.it, name)


def test_a_run_that_lost_its_lock_stops_before_its_next_save(tmp_path, data_dir, monkeypatch):
    real = pipeline.make_train_loader
    monkeypatch.setattr(pipeline, "make_train_loader",
                        lambda *a, **k: _TakenOverAtStep3(iter(real(*a, **k)), tmp_path))
    monkeypatch.setattr(lock_lib, "HEARTBEAT_SECONDS", 0.05)
    config = config_lib.apply_overrides(tiny(), [f"config.data.data_dir={data_dir}"])
    with pytest.raises(WorkdirLockLostError, match="lost the lock of workdir .* \\(host elsewhere pid 77\\)"):
        train(config, str(tmp_path), verbose=False)
    assert os.listdir(tmp_path / "checkpoints") == []  # the save at step 4 was not written
    assert json.loads((tmp_path / "lock.json").read_text())["run_id"] == "the-other-run"  # theirs, left alone


def _cmd(workdir, data_dir, *extra):
    return [sys.executable, "-m", "mmjax", "train", "--config", TINY, "--workdir", str(workdir),
            f"--config.data.data_dir={data_dir}", *extra]


def _cli(workdir, data_dir, *extra):
    return subprocess.run(_cmd(workdir, data_dir, *extra), env=mmjax_env(8), capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


def _start(workdir, data_dir, *extra):
    """Starts `mmjax train` and returns it once it holds the workdir's lock."""
    proc = subprocess.Popen(_cmd(workdir, data_dir, "--quiet", *extra), env=mmjax_env(8), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (workdir / "lock.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert (workdir / "lock.json").exists(), proc.communicate(timeout=60)[0]
    return proc


def _params(workdir):
    return jax.tree.leaves(jax.device_get(mmjax.load(str(workdir)).encoder.params))


@pytest.mark.slow
def test_second_run_exits_2_at_once_and_the_first_is_unaffected(tmp_path, data_dir):
    solo, shared = tmp_path / "solo", tmp_path / "shared"
    r = _cli(solo, data_dir, "--quiet")
    assert r.returncode == 0, r.stderr
    first = _start(shared, data_dir)
    os.kill(first.pid, signal.SIGSTOP)  # holds the lock, whatever it was doing, while the second run tries
    try:
        t0 = time.perf_counter()
        second = _cli(shared, data_dir)
        took = time.perf_counter() - t0
    finally:
        os.kill(first.pid, signal.SIGCONT)
    out, _ = first.communicate(timeout=600)
    assert first.returncode == 0, out
    assert second.returncode == 2, second.stdout + second.stderr
    errors = [line for line in second.stderr.splitlines() if line.startswith("mmjax: error:")]
    assert len(errors) == 1 and "Traceback" not in second.stderr, second.stderr
    match = IN_USE.match(errors[0])
    assert match and match[1] == str(shared) and match[3] == str(first.pid), errors[0]
    assert "mmjax: mesh" not in second.stdout, second.stdout  # refused before building anything
    print(f"second run refused in {took:.1f} s")
    # The first run is a solo run: the same per-step losses, once each, and bit-identical parameters.
    losses = [(m["step"], m["loss"]) for m in read_metrics(str(shared)) if "loss" in m]
    assert losses == [(m["step"], m["loss"]) for m in read_metrics(str(solo)) if "loss" in m]
    assert [s for s, _ in losses] == list(range(1, 9))
    for a, b in zip(_params(solo), _params(shared)):
        np.testing.assert_array_equal(a, b)
    assert not (shared / "lock.json").exists() and not (solo / "lock.json").exists()  # released at the end


def test_stale_lock_of_a_killed_run_is_taken_over(tmp_path, data_dir):
    killed = _start(tmp_path, data_dir)
    killed.kill()
    killed.communicate(timeout=60)
    assert json.loads((tmp_path / "lock.json").read_text())["pid"] == killed.pid
    r = _cli(tmp_path, data_dir, "--quiet", "--stop-at-step=2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(rf"mmjax: taking over the lock of host \S+ pid {killed.pid}, last seen \d+ s ago \(its "
                     r"process is gone\)", r.stdout), r.stdout
    assert not (tmp_path / "lock.json").exists()


def test_force_unlock_takes_over_and_only_the_holder_sets_incomplete_checkpoints_aside(tmp_path, data_dir):
    interrupted = tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp-1234"
    interrupted.mkdir(parents=True)
    holder = _lock(tmp_path)
    holder.acquire()  # a live run of this machine
    r = _cli(tmp_path, data_dir, "--quiet", "--stop-at-step=1")
    assert r.returncode == 2 and IN_USE.search(r.stderr) and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert interrupted.exists()  # a refused run touches nothing
    r = _cli(tmp_path, data_dir, "--quiet", "--stop-at-step=1", "--force-unlock")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"mmjax: warning: --force-unlock: taking over the lock of host {socket.gethostname()} pid " \
           f"{os.getpid()}" in r.stdout
    assert not interrupted.exists() and (tmp_path / "checkpoints.incomplete" / interrupted.name).exists()
    assert not (tmp_path / "lock.json").exists()
    assert not holder.release()


@pytest.fixture(params=["gs", "s3"])
def bucket_workdir(request):
    return request.getfixturevalue(f"{request.param}_bucket")


def test_lock_on_an_object_store_is_a_compare_and_swap(bucket_workdir, tmp_path, monkeypatch):
    """On gs:// (ifGenerationMatch) and s3:// (If-None-Match / If-Match), against the servers: one holder at a time,
    a second run refused with the holder named, a stale lock taken over by exactly one of two runs, a lost lock
    noticed at the next refresh, and release only by the holder. No local folder named after the scheme."""
    monkeypatch.chdir(tmp_path)
    messages = []
    first = lock_lib.WorkdirLock(lock_lib.open_store(bucket_workdir), bucket_workdir, log=messages.append)
    first.acquire()
    assert first.refresh() and first.holder()[0].run_id == first.run_id
    second = lock_lib.WorkdirLock(lock_lib.open_store(bucket_workdir), bucket_workdir, log=messages.append)
    with pytest.raises(WorkdirLockedError, match=rf"workdir {bucket_workdir} is in use by host \S+ pid {os.getpid()}"):
        second.acquire()
    # the first run's heartbeat lapses (another machine, seen by its host name): two runs race to take over
    holder, generation = first.holder()
    stale = dataclasses.replace(holder, host="other-host", heartbeat=holder.heartbeat - 3600)
    assert first.store.replace(stale.to_bytes(), generation) is not None
    racers = [lock_lib.WorkdirLock(lock_lib.open_store(bucket_workdir), bucket_workdir, log=messages.append)
              for _ in range(2)]
    seen = racers[0].holder()[1]
    wins = [r.store.replace(Holder.me(r.run_id, r.started).to_bytes(), seen) is not None for r in racers]
    assert wins == [True, False]
    assert any("taking over" in m for m in messages) is False  # the race above bypassed acquire(): no message
    assert not first.refresh() and first.lost  # the old holder finds out at its next heartbeat
    assert not first.release()  # and does not remove the new holder's lock
    assert racers[0].holder()[0].run_id == racers[0].run_id
    racers[0].generation = racers[0].holder()[1]
    assert racers[0].release() and racers[0].holder() is None
    third = lock_lib.WorkdirLock(lock_lib.open_store(bucket_workdir), bucket_workdir, log=messages.append,
                                 stale_after_seconds=0.0)
    third.acquire()
    assert third.release()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(":")]


def test_stale_lock_on_a_bucket_is_taken_over_with_a_message(bucket_workdir, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    messages = []
    old = lock_lib.WorkdirLock(lock_lib.open_store(bucket_workdir), bucket_workdir)
    old.acquire()
    holder, generation = old.holder()
    old.store.replace(dataclasses.replace(holder, host="gone-host", heartbeat=holder.heartbeat - 600).to_bytes(),
                      generation)
    new = lock_lib.WorkdirLock(lock_lib.open_store(bucket_workdir), bucket_workdir, log=messages.append)
    new.acquire()
    assert messages and "taking over the lock of host gone-host" in messages[0]
    assert "heartbeat is older than 60 s" in messages[0]
    assert new.release()
