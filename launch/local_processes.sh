#!/usr/bin/env bash
# Runs one `flanjax train` per process on this machine, as a multi-host job would: each
# process owns DEVICES_PER_PROCESS CPU devices and reads its own shard of the data.
# The same as `flanjax launch local --processes N -- ARGS` (launch/local.py), which it calls.
#
#   launch/local_processes.sh 2 --gin_file=configs/runs/quickstart.gin --gin.MODEL_DIR=runs/mp
#
# Env: DEVICES_PER_PROCESS (default 4), PORT (default 12355), FLANJAX (the flanjax executable).
set -euo pipefail
n=${1:?usage: $0 NUM_PROCESSES FLANJAX_TRAIN_ARGS...}
shift
here=$(cd "$(dirname "$0")/.." && pwd)
flanjax=${FLANJAX:-$here/.venv/bin/flanjax}
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"  # the launch package, whichever directory this runs in
exec "$flanjax" launch local --processes "$n" --devices_per_process "${DEVICES_PER_PROCESS:-4}" --port "${PORT:-12355}" -- "$@"
