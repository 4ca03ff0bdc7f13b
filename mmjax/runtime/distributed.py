"""Joining a multi-process (multi-host) run, and agreeing across processes.

`initialize()` calls `jax.distributed.initialize` when the run has several processes:
- explicitly, from flags or the environment variables MMJAX_COORDINATOR (host:port),
  MMJAX_NUM_PROCESSES and MMJAX_PROCESS_ID (what `launch/local.sh` sets);
- automatically where the cluster describes itself: TPU VMs of a multi-host slice, and SLURM jobs
  with more than one task (jax's own cluster detection reads their variables).
A single-process run needs none of it.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from mmjax.errors import ConfigError

_ENV = ("MMJAX_COORDINATOR", "MMJAX_NUM_PROCESSES", "MMJAX_PROCESS_ID")


def _cluster_detected() -> bool:
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h]) > 1


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Joins the multi-process run if there is one. Returns whether jax.distributed was initialised."""
    coordinator = coordinator or os.environ.get("MMJAX_COORDINATOR")
    if num_processes is None and os.environ.get("MMJAX_NUM_PROCESSES"):
        num_processes = int(os.environ["MMJAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("MMJAX_PROCESS_ID"):
        process_id = int(os.environ["MMJAX_PROCESS_ID"])
    explicit = [coordinator, num_processes, process_id]
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ConfigError([f"a multi-process run needs all of --coordinator, --num-processes and "
                               f"--process-id (or the variables {', '.join(_ENV)}); got "
                               f"coordinator={coordinator}, num_processes={num_processes}, "
                               f"process_id={process_id}"])
        if num_processes == 1:
            return False
        if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator, num_processes, process_id)
        return True
    if _cluster_detected():
        jax.distributed.initialize()
        return True
    return False


def any_process(flag: bool) -> bool:
    """True on every process if `flag` is true on any (a collective: all processes must call it)."""
    if jax.process_count() == 1:
        return flag

    return bool(np.any(multihost_utils.process_allgather(np.asarray([flag], np.int32))))


def broadcast_text(text: str, max_bytes: int = 4096) -> str:
    """Process 0's `text` (up to `max_bytes` of UTF-8) on every process (a collective: all processes must call
    it; what the others pass is ignored)."""
    if jax.process_count() == 1:
        return text
    buffer = np.zeros(max_bytes, np.uint8)
    data = text.encode()[:max_bytes]
    buffer[:len(data)] = np.frombuffer(data, np.uint8)
    received = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
    return bytes(received).rstrip(b"\0").decode(errors="replace")
