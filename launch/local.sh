#!/usr/bin/env bash
# One job as N processes on this machine, joined by jax.distributed over localhost: the
# multi-host code path (per-process data shares, checkpoints, evaluation) without a cluster.
#
#   launch/local.sh N COMMAND [ARGS...]
#   launch/local.sh 2 python -m experiments.run --config=experiments/demo.py:tiny \
#       --workdir=runs/two --config.mesh.data=2
#
# Each process gets DEVICES CPU devices (default 4) and the flags --distributed
# --coordinator_address --num_processes --process_id. With LOGDIR set, process i writes to
# LOGDIR/process_i.log (and its pid to process_i.pid) instead of the terminal. SIGTERM is passed
# on to every process. Fails when any process fails.
set -euo pipefail
if [[ $# -lt 2 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: launch/local.sh N COMMAND [ARGS...]  (N = number of processes)" >&2
  exit 2
fi
processes=$1
shift
port=${PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')}
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${DEVICES:-4}" JAX_PLATFORMS=cpu
pids=()
for ((i = 0; i < processes; i++)); do
  flags=(--distributed --coordinator_address="localhost:$port" --num_processes="$processes" --process_id="$i")
  if [[ -n ${LOGDIR:-} ]]; then
    "$@" "${flags[@]}" >"$LOGDIR/process_$i.log" 2>&1 &
  else
    "$@" "${flags[@]}" &
  fi
  pids+=($!)
  [[ -z ${LOGDIR:-} ]] || echo $! >"$LOGDIR/process_$i.pid"
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' TERM  # a preempted job: every process saves
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || { code=$?; [[ $status -ne 0 ]] || status=$code; }
done
exit $status
