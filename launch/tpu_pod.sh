#!/usr/bin/env bash
# Runs mmjax on every host of a Cloud TPU VM slice (or several slices): one process per host, all
# started by `gcloud compute tpus tpu-vm ssh --worker=all`. jax.distributed finds the slice's hosts
# by itself on TPU VMs (mmjax.runtime.distributed.initialize), so no coordinator flags are needed.
#
#   launch/tpu_pod.sh setup  TPU_NAME ZONE [REPO_URL]      # install mmjax[tpu] on every host
#   launch/tpu_pod.sh run    TPU_NAME ZONE COMMAND...      # e.g. mmjax train --config ... --workdir gs://...
#   launch/tpu_pod.sh stop   TPU_NAME ZONE                 # end mmjax processes left on the hosts
#
# Env: MMJAX_DIR (checkout on the hosts, default ~/mmjax), MMJAX_REF (git ref, default main),
#      PROJECT (gcloud project, default the configured one), NUM_SLICES (multi-slice, default 1:
#      then TPU_NAME is a queued-resource name whose slices are TPU_NAME-0 .. TPU_NAME-<N-1>; see
#      launch/README.md), EXTRA_ENV ('VAR=value ...' exported on the hosts), DRY_RUN=1 (print the gcloud commands instead of running them).
# Logs: each host writes ~/mmjax_run.log; gcloud streams every worker's output to this terminal.
set -euo pipefail
usage() { sed -n '2,15p' "$0" >&2; exit 2; }
[ $# -ge 3 ] || usage
action=$1 tpu=$2 zone=$3; shift 3
dir=${MMJAX_DIR:-'~/mmjax'}
ref=${MMJAX_REF:-main}
slices=${NUM_SLICES:-1}
project=${PROJECT:+--project=$PROJECT}

ssh_all() {  # ssh_all TPU_VM_NAME REMOTE_COMMAND
  local cmd=(gcloud compute tpus tpu-vm ssh "$1" --zone="$zone" $project --worker=all --command="$2")
  if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q ' "${cmd[@]}"; echo; else "${cmd[@]}"; fi
}

worker_ips() {  # comma-separated internal IPs of a TPU VM's workers, worker 0 first
  if [ "${DRY_RUN:-0}" = 1 ]; then echo "10.0.0.1,10.0.0.2"; return; fi
  gcloud compute tpus tpu-vm describe "$1" --zone="$zone" $project \
    --format='value(networkEndpoints[].ipAddress)' | tr ';' ','
}

slice_names() {
  if [ "$slices" = 1 ]; then echo "$tpu"; else for ((s = 0; s < slices; s++)); do echo "$tpu-$s"; done; fi
}

case "$action" in
  setup)
    repo=${1:-https://github.com/OWNER/mmjax.git}
    remote="set -e; if [ ! -d $dir ]; then git clone -q $repo $dir; fi; cd $dir && git fetch -q && \
git checkout -q $ref && python3 -m pip install -q -U pip && python3 -m pip install -q -e '.[tpu]' && \
python3 -c 'import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0].device_kind)'"
    for name in $(slice_names); do ssh_all "$name" "$remote" & done
    wait
    ;;
  run)
    [ $# -ge 1 ] || usage
    user_cmd=$(printf '%q ' "$@")
    base="set -o pipefail; cd $dir && export JAX_PLATFORMS=tpu${EXTRA_ENV:+ $EXTRA_ENV}"
    pids=()
    slice_id=0
    for name in $(slice_names); do
      # TPU_WORKER_HOSTNAMES tells mmjax.runtime.distributed.initialize that the slice has several hosts;
      # jax.distributed.initialize() then discovers them itself.
      hosts=$(worker_ips "$name")
      env_vars="export TPU_WORKER_HOSTNAMES=$hosts"
      if [ "$slices" != 1 ]; then
        # Multislice over DCN: worker 0 of slice 0 coordinates the slices.
        coord=$(worker_ips "$(slice_names | head -n 1)" | cut -d, -f1)
        env_vars="$env_vars MEGASCALE_COORDINATOR_ADDRESS=$coord:8080 MEGASCALE_PORT=8080 \
MEGASCALE_NUM_SLICES=$slices MEGASCALE_SLICE_ID=$slice_id"
      fi
      ssh_all "$name" "$env_vars; $base && $user_cmd 2>&1 | tee ~/mmjax_run.log" & pids+=($!)
      slice_id=$((slice_id + 1))
    done
    status=0
    for p in "${pids[@]}"; do wait "$p" || status=1; done
    exit $status
    ;;
  stop)
    for name in $(slice_names); do
      ssh_all "$name" "pkill -u \$USER -f 'mmjax train' || true; sudo rm -f /tmp/libtpu_lockfile" &
    done
    wait
    ;;
  *) usage ;;
esac
