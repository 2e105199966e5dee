#!/usr/bin/env bash
# Multi-host on one machine: N processes on 127.0.0.1, each with its own CPU devices, joined by
# jax.distributed and gloo collectives. The way tests (and the curious) try multi-host runs.
#
#   DEVICES_PER_PROCESS=4 launch/local.sh 2 python -m llm.train --config=configs/gpt_tiny.py \
#       --workdir=runs/local2x4
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: [DEVICES_PER_PROCESS=K] [PORT=P] $0 N COMMAND..." >&2
  exit 2
fi
n=$1; shift
port=${PORT:-$((20000 + RANDOM % 20000))}
export JAX_PLATFORMS=cpu
export XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-1} ${XLA_FLAGS:-}"
pids=()
for ((i = 0; i < n; i++)); do
  "$@" --coordinator_address="127.0.0.1:$port" --num_processes="$n" --process_id="$i" &
  pids+=($!)
done
# Ctrl-C reaches every process: each saves the current step and exits 75 (see
# llm/preemption.py); this script outlives the signal and passes their exit status on.
trap ':' INT TERM
status=0
for pid in "${pids[@]}"; do
  while true; do
    wait "$pid" && rc=0 || rc=$?
    kill -0 "$pid" 2>/dev/null || break  # else the wait was cut short by a signal
  done
  [ "$rc" -eq 0 ] || status=$rc
done
exit $status
