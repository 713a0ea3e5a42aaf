#!/usr/bin/env bash
# Runs one `flanjax train` per process on this machine, as a multi-host job would: each
# process owns DEVICES_PER_PROCESS CPU devices and reads its own shard of the data.
#
#   launch/local_processes.sh 2 --gin_file=configs/runs/quickstart.gin --gin.MODEL_DIR=runs/mp
#
# Env: DEVICES_PER_PROCESS (default 4), PORT (default 12355).
set -euo pipefail
n=${1:?usage: $0 NUM_PROCESSES FLANJAX_TRAIN_ARGS...}
shift
here=$(cd "$(dirname "$0")/.." && pwd)
flanjax=${FLANJAX:-$here/.venv/bin/flanjax}
export XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-4}"
pids=()
for ((i = 0; i < n; i++)); do
  "$flanjax" train --coordinator_address="127.0.0.1:${PORT:-12355}" --num_processes="$n" --process_id="$i" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
