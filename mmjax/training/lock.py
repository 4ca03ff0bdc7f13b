"""One run per workdir: `mmjax train` holds an exclusive lock on its workdir for the life of the run.

The lock is one small JSON object, `W/lock.json`: who holds it (host, pid, run id, start time) and a heartbeat
timestamp that a background thread refreshes every `HEARTBEAT_SECONDS`. Process 0 acquires it for the whole run
and tells the other processes whether it did (`hold`), so every process of a second run on the same workdir
exits 2 at once, before compiling, with "workdir W is in use by host H pid P since T; ...".

A lock is stale, and is taken over with a message, when its holder is gone:
- same machine (hostname, boot id and pid namespace): the holder's pid is not alive (or is another process now);
- another machine: its heartbeat is older than `STALE_AFTER_SECONDS`.
`--force-unlock` takes over any lock, with a warning. At the end of the run (normal end, preemption stop, error)
the lock is released, only if it is still ours (its run id). Should another run take the lock over while we run
(our heartbeat lapsed: the process was stopped, a disk hung), the next checkpoint save stops this run with
`WorkdirLockLostError` instead of writing into a workdir someone else now owns.

Every change to the lock is a compare-and-swap on a *generation*, so that two runs racing for one workdir never
both win; a `LockStore` provides four operations:
- `create(data)`: write the lock only if there is none; its generation, or None when one exists;
- `read()`: (data, generation, last-modified time), or None;
- `replace(data, generation)`: write only if the lock still has `generation` (a refresh, or a takeover of a
  stale lock); the new generation, or None when it changed;
- `delete(generation)`: remove only if the lock still has `generation` (a release).

`LocalLockStore` (local disks, NFS): the generation is the file's content (it holds a fresh run id and heartbeat
time). `create` links a complete temporary file to `lock.json` (`link()` fails if the name exists, atomically,
also over NFS, and readers never see a half-written lock; on file systems without hard links it creates the file
with O_CREAT|O_EXCL under the guard); `replace` and `delete` compare and write under a short `flock` on
`W/lock.json.guard`, which the kernel releases if the process dies.

Object stores (gs://, s3://) carry the same design with the store's own preconditions, no guard file
(mmjax/training/lock_stores.py): on gs:// `ifGenerationMatch` (0 to create, the held generation to refresh, take
over or delete), on s3:// conditional writes (`If-None-Match: *` to create, `If-Match: <ETag>` otherwise). The
generation read with the object is what a takeover passes, so of several runs taking over one stale lock exactly
one wins. The heartbeat age compares the holder's clock with ours: hosts of one pod keep their clocks in sync
(NTP); a lock is stale only after STALE_AFTER_SECONDS (six heartbeats), far above normal skew.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import jax

from mmjax import storage
from mmjax.errors import MmjaxError, RuntimeFault, StorageError
from mmjax.runtime import distributed
from mmjax.training import lock_stores
from mmjax.training.lock_stores import LOCK_NAME, LocalLockStore, LockStore

UNREADABLE = "(unreadable)"  # the host of a lock whose content cannot be read
HEARTBEAT_SECONDS = 10.0
STALE_AFTER_SECONDS = 60.0  # six missed heartbeats: only for a holder on another machine


class WorkdirLockedError(MmjaxError):
    """Another run holds the workdir's lock (exit code 2)."""


class WorkdirLockError(StorageError):
    """The lock could not be read or written (storage: a read-only or full workdir; exit code 1)."""


class WorkdirLockLostError(RuntimeFault, RuntimeError):
    """Another run took over the workdir's lock while this run was going."""


_ERRORS = {cls.__name__: cls for cls in (WorkdirLockedError, WorkdirLockError)}


@dataclasses.dataclass(frozen=True)
class Holder:
    """Who holds a lock. `machine` tells processes of one kernel and pid namespace apart from others that share a
    hostname (containers); `pid_start` tells the holder from a later process that reuses its pid."""

    host: str
    pid: int
    run_id: str
    started: float
    heartbeat: float
    machine: str = ""
    pid_start: str = ""

    def to_bytes(self) -> bytes:
        return (json.dumps(dataclasses.asdict(self), indent=1) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes, modified: float) -> Holder:
        """The holder a lock's content names; an unreadable one is an unknown holder last seen at `modified`."""
        try:
            fields = json.loads(data)
            holder = cls(**{f.name: fields[f.name] for f in dataclasses.fields(cls) if f.name in fields})
            return dataclasses.replace(holder, pid=int(holder.pid), started=float(holder.started),
                                       heartbeat=float(holder.heartbeat))
        except (ValueError, TypeError, KeyError):
            return cls(host=UNREADABLE, pid=0, run_id="", started=modified, heartbeat=modified)

    def describe(self) -> str:
        return "an unreadable lock" if self.host == UNREADABLE else f"host {self.host} pid {self.pid}"

    @classmethod
    def me(cls, run_id: str, started: float) -> Holder:
        pid = os.getpid()
        return cls(socket.gethostname(), pid, run_id, started, time.time(), _machine_id(), _pid_start(pid))


def _read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _machine_id() -> str:
    """This kernel's boot id and pid namespace: pids are comparable between processes that share both."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    boot = _read_text("/proc/sys/kernel/random/boot_id")
    return f"{boot}/{namespace}" if boot or namespace else ""  # '': pids are never compared (heartbeats are)


def _pid_start(pid: int) -> str:
    """When process `pid` started (clock ticks since boot, from /proc), or '' where that cannot be read."""
    stat = _read_text(f"/proc/{pid}/stat")
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else ""


def pid_alive(pid: int, started: str = "") -> bool:
    """Whether process `pid` of this machine is alive and is the one that started at `started` (if given)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by another user
    stat = _read_text(f"/proc/{pid}/stat").rsplit(")", 1)[-1].split()
    if stat and stat[0] in ("Z", "X"):  # a zombie: killed, not yet reaped
        return False
    return not (started and stat and _pid_start(pid) != started)


def open_store(workdir: str) -> LockStore:
    """The lock store of a workdir: `W/lock.json` as a file on a local or network disk, or as an object on a bucket."""
    if storage.is_url(workdir):
        return lock_stores.object_store(workdir)
    return LocalLockStore(os.path.join(workdir, LOCK_NAME))


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(t))


def _ago(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 120:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s // 60 % 60:02d}m"


class WorkdirLock:
    """The lock of one workdir, as one run holds it: `acquire`, `refresh` (by a heartbeat thread between `start`
    and `stop`), `release`, and `holder` (who holds it now)."""

    def __init__(self, store: LockStore, workdir: str, *, heartbeat_seconds: float | None = None,
                 stale_after_seconds: float | None = None, log: Callable = print):
        """heartbeat_seconds, stale_after_seconds: HEARTBEAT_SECONDS and STALE_AFTER_SECONDS when None."""
        self.store, self.workdir, self.log = store, workdir, log
        self.heartbeat_seconds = HEARTBEAT_SECONDS if heartbeat_seconds is None else heartbeat_seconds
        self.stale_after_seconds = STALE_AFTER_SECONDS if stale_after_seconds is None else stale_after_seconds
        self.run_id = uuid.uuid4().hex
        self.started = time.time()
        self.generation: object | None = None
        self.lost: str | None = None  # who took the lock from us ("host H pid P"), once that happened
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._refresh_failed = False

    def holder(self) -> tuple[Holder, object] | None:
        """Who holds the lock now, with the lock's generation; None when nobody does."""
        current = self.store.read()
        if current is None:
            return None
        data, generation, modified = current
        return Holder.from_bytes(data, modified), generation

    def _stale_reason(self, holder: Holder, now: float) -> str | None:
        """Why `holder` no longer holds the lock, or None when it may still be running."""
        me = Holder.me(self.run_id, self.started)
        if holder.host == me.host and holder.machine and holder.machine == me.machine:
            return None if pid_alive(holder.pid, holder.pid_start) else "its process is gone"
        if now - holder.heartbeat > self.stale_after_seconds:
            return f"its heartbeat is older than {self.stale_after_seconds:.0f} s"
        return None

    def _in_use(self, holder: Holder, now: float) -> WorkdirLockedError:
        if holder.host == UNREADABLE:
            return WorkdirLockedError(
                f"workdir {self.workdir} is in use: its lock {self.store.location} cannot be read (written "
                f"{_ago(now - holder.heartbeat)} ago; taken over once older than {self.stale_after_seconds:.0f} s); "
                f"stop the run using it or pass --force-unlock after checking")
        return WorkdirLockedError(
            f"workdir {self.workdir} is in use by host {holder.host} pid {holder.pid} since {_when(holder.started)}; "
            f"stop it or pass --force-unlock after checking (last heartbeat {_ago(now - holder.heartbeat)} ago, "
            f"in {self.store.location})")

    def acquire(self, force: bool = False) -> None:
        """Takes the lock: creates it, or takes over a stale one (or any one, with `force`), saying so. Raises
        WorkdirLockedError when another run holds it, WorkdirLockError when storage fails."""
        for _ in range(5):  # another run may change the lock between our read and our write: look again
            me = Holder.me(self.run_id, self.started)
            self.generation = self.store.create(me.to_bytes())
            if self.generation is not None:
                return
            current = self.holder()
            if current is None:  # released meanwhile
                continue
            holder, generation = current
            now = time.time()
            reason = "--force-unlock" if force else self._stale_reason(holder, now)
            if reason is None:
                raise self._in_use(holder, now)
            self.generation = self.store.replace(me.to_bytes(), generation)
            if self.generation is not None:
                self._say_taken_over(holder, now, reason)
                return
        raise WorkdirLockedError(f"workdir {self.workdir}: other runs keep changing its lock "
                                 f"{self.store.location}; stop them or pass --force-unlock after checking")

    def _say_taken_over(self, holder: Holder, now: float, reason: str) -> None:
        subject = "an unreadable lock" if holder.host == UNREADABLE else f"the lock of {holder.describe()}"
        seen = f"{subject}, last seen {_ago(now - holder.heartbeat)} ago"
        if reason == "--force-unlock":
            self.log(f"mmjax: warning: --force-unlock: taking over {seen} (running since "
                     f"{_when(holder.started)}). If that run is still going, stop it now: two runs on one "
                     f"workdir overwrite each other's checkpoints and metrics")
        else:
            self.log(f"mmjax: taking over {seen} ({reason})")

    def refresh(self) -> bool:
        """Writes a new heartbeat if the lock is still ours; False (and `lost` set) when another run took it."""
        generation = self.store.replace(Holder.me(self.run_id, self.started).to_bytes(), self.generation)
        if generation is not None:
            self.generation = generation
            return True
        current = self.holder()
        self.lost = current[0].describe() if current else "nobody: its lock file was deleted"
        self.log(f"mmjax: warning: this run lost the lock of workdir {self.workdir} ({self.lost}); stopping at the "
                 f"next checkpoint without writing it")
        return False

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            try:
                if not self.refresh():
                    return
            except OSError as e:  # storage trouble: say so once, keep trying
                if not self._refresh_failed:
                    self.log(f"mmjax: warning: could not refresh the lock {self.store.location} ({e}); "
                             f"retrying every {self.heartbeat_seconds:.0f} s")
                self._refresh_failed = True

    def start(self) -> None:
        """Refreshes the heartbeat every `heartbeat_seconds` in a background thread until `stop`."""
        self._thread = threading.Thread(target=self._beat, name="mmjax-workdir-lock", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def release(self) -> bool:
        """Stops the heartbeat and removes the lock if it is still ours; returns whether it was."""
        self.stop()
        if self.generation is None or self.lost is not None:
            return False
        try:
            released = self.store.delete(self.generation)
        except OSError as e:  # never hides the error the run may be ending with
            self.log(f"mmjax: warning: could not remove the lock {self.store.location} ({e}); the next run takes "
                     f"it over once it is stale")
            return True
        if not released:
            self.log(f"mmjax: warning: the lock {self.store.location} was no longer this run's at the end; left it")
        return released


class RunLock:
    """What every process of a run holds: the lock itself on process 0, nothing on the others."""

    def __init__(self, workdir: str, lock: WorkdirLock | None):
        self.workdir, self.lock = workdir, lock

    def check(self) -> None:
        """Raises WorkdirLockLostError on every process if another run took the lock over (a collective on
        multi-process runs: all processes call it at the same points, e.g. before each checkpoint save)."""
        lost = self.lock.lost if self.lock is not None else None
        if distributed.any_process(lost is not None):
            raise WorkdirLockLostError(
                f"this run lost the lock of workdir {self.workdir} ({lost or 'see process 0'}) while it was going: "
                f"its heartbeat lapsed, or another run took it with --force-unlock. Stopped without writing a "
                f"checkpoint, so that two runs do not mix in the workdir; check which run should own it")


def _acquire_on_process_0(workdir: str, force: bool, log: Callable) -> tuple[WorkdirLock | None, str]:
    """Process 0 acquires; returns (the lock or None, the error as JSON or '') for the other processes."""
    if jax.process_index() != 0:
        return None, ""
    try:
        lock = WorkdirLock(open_store(workdir), workdir, log=log)
        storage.makedirs(workdir)
        lock.acquire(force)
    except tuple(_ERRORS.values()) as e:
        return None, json.dumps({"error": type(e).__name__, "message": str(e)})
    except OSError as e:
        error = WorkdirLockError.from_os_error(e, "cannot lock the workdir: cannot write", e.filename or workdir)
        return None, json.dumps({"error": "WorkdirLockError", "message": str(error)})
    return lock, ""


@contextlib.contextmanager
def hold(workdir: str, *, force: bool = False, log: Callable = print) -> Iterator[RunLock]:
    """Holds the workdir's lock for the body: process 0 acquires it (and refreshes its heartbeat), every process
    learns whether it did, and all raise the same WorkdirLockedError (exit 2) or WorkdirLockError (exit 1)
    together. Released at the end however the body ends, only if it is still ours."""
    lock, error = _acquire_on_process_0(workdir, force, log)
    error = distributed.broadcast_text(error)
    if error:
        problem = json.loads(error)
        raise _ERRORS[problem["error"]](problem["message"])
    if lock is not None:
        lock.start()
    try:
        yield RunLock(workdir, lock)
    finally:
        if lock is not None:
            lock.release()
