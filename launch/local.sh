#!/usr/bin/env bash
# Starts N mmjax processes on this machine (127.0.0.1), each with D fake CPU devices: a real
# multi-process run (jax.distributed, gloo collectives) without a cluster.
#
#   launch/local.sh N D mmjax train --config configs/demo.py --workdir /tmp/mp --config.mesh.data=-1
#
# Env: MMJAX_PORT (default: a free port); XLA_FLAGS is passed on. Each process's output goes to WORKDIR-less logs
# ${MMJAX_LOG_DIR:-/tmp}/mmjax_proc_<i>.log; process 0's is also shown. Exits non-zero if any
# process fails, and stops the others.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS COMMAND..." >&2
  exit 2
fi
n=$1; d=$2; shift 2
port=${MMJAX_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}
logdir=${MMJAX_LOG_DIR:-/tmp}
mkdir -p "$logdir"
# The caller's XLA_FLAGS are passed on, except a device count of their own.
xla_flags=$(echo "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g')
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup INT TERM
for ((i = 0; i < n; i++)); do
  log="$logdir/mmjax_proc_$i.log"
  env JAX_PLATFORMS=cpu XLA_FLAGS="$xla_flags --xla_force_host_platform_device_count=$d" \
      MMJAX_COORDINATOR="127.0.0.1:$port" MMJAX_NUM_PROCESSES="$n" MMJAX_PROCESS_ID="$i" \
      "$@" >"$log" 2>&1 &
  pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "mmjax launch: process $i failed; its log: $logdir/mmjax_proc_$i.log" >&2
    tail -n 20 "$logdir/mmjax_proc_$i.log" >&2
    status=1
    cleanup
  fi
done
cat "$logdir/mmjax_proc_0.log"
exit $status
