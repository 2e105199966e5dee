#!/usr/bin/env bash
# Runs one command on every worker of a Cloud TPU VM slice. JAX finds the slice's other hosts
# itself (jax.distributed.initialize with no arguments), so the command is the same everywhere.
#
#   TPU=my-v4-32 ZONE=us-central2-b launch/tpu_vm.sh \
#       python -m llm.train --config=configs/gpt_small.py --workdir=gs://bucket/runs/gpt_small
#
# The repository must be at the same path on every worker (clone it there first, or use
# `launch/tpu_vm.sh git clone ...` then `launch/tpu_vm.sh pip install -r requirements.txt`).
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}"
: "${ZONE:?set ZONE to its zone}"
if [ $# -lt 1 ]; then
  echo "usage: TPU=NAME ZONE=ZONE $0 COMMAND..." >&2
  exit 2
fi
repo=${REPO_DIR:-\$HOME/$(basename "$(pwd)")}
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"} \
  --worker=all --command="cd $repo && $(printf '%q ' "$@")"
