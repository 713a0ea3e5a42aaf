#!/usr/bin/env bash
# Runs `flanjax train` on every worker of a Cloud TPU VM pod slice. JAX discovers the
# other hosts itself (`--multiprocess`); every host reads its own shard of the data.
#
#   launch/tpu_pod.sh TPU_NAME ZONE --gin_file=configs/runs/sft.gin --gin.MODEL_DIR=gs://bucket/run
#
# Assumes the repository is checked out at ~/flanjax on every worker with `make .venv/.installed`
# run there (or: pip install -e '.[tpu]'). Pre-emption sends SIGTERM: the run saves and exits;
# relaunch the same command to resume.
set -euo pipefail
tpu=${1:?usage: $0 TPU_NAME ZONE FLANJAX_TRAIN_ARGS...}
zone=${2:?usage: $0 TPU_NAME ZONE FLANJAX_TRAIN_ARGS...}
shift 2
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all \
  --command="cd ~/flanjax && .venv/bin/flanjax train --multiprocess${args}"
