#!/usr/bin/env bash
# Run llava_jax on every host of a Cloud TPU VM pod slice (the same command on all workers).
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh \
#     --config configs/stage2_finetune.py:llava-v1.5-13b --workdir gs://bucket/runs/ft13b [--config.key=value ...]
#
# First run installs the project on every worker (REPO_URL / BRANCH select the code); later runs reuse it.
# jax.distributed.initialize() reads the pod topology from TPU metadata, so no addresses are passed.
# Data and workdir must be reachable from every host (GCS, or a shared filesystem).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
REPO_URL=${REPO_URL:-}
BRANCH=${BRANCH:-main}
DIR=${REMOTE_DIR:-llava_jax}

setup=""
if [ -n "$REPO_URL" ]; then
  setup="[ -d $DIR ] || git clone -b $BRANCH $REPO_URL $DIR; cd $DIR && git fetch -q && git checkout -q $BRANCH && git pull -q && pip install -q -e '.[tpu]' && cd ~;"
fi
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all \
  --command="$setup cd $DIR && python -m llava_jax.train$args"
