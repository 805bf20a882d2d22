#!/usr/bin/env bash
# Runs N cooperating JAX processes on this machine (multi-host rehearsal on one box).
#
# Usage:
#   launch/local_multiprocess.sh N COMMAND [ARGS...]
#   launch/local_multiprocess.sh 2 python -m cxrjax.main --config=configs/quickstart.py \
#       --workdir=/tmp/quickstart_2proc
#
# Each process gets JAX_COORDINATOR_ADDRESS=127.0.0.1:$PORT, JAX_NUM_PROCESSES=N and
# JAX_PROCESS_ID=i, which cxrjax.parallel.maybe_initialize_distributed() turns into
# jax.distributed.initialize(...). On CPU each process has 1 device unless XLA_FLAGS says
# otherwise (e.g. XLA_FLAGS=--xla_force_host_platform_device_count=4 gives 4 per process).
#
# Environment:
#   JAX_COORDINATOR_PORT  port of process 0's coordinator (default: a free port)
#   GPUS_PER_PROCESS=k    give process i the GPUs i*k .. i*k+k-1 (CUDA_VISIBLE_DEVICES)
#
# Ctrl-C or SIGTERM to this script reaches every process once, as SIGTERM: they save one
# checkpoint at the same step and exit 0 (the processes themselves ignore the terminal's
# SIGINT). If one process fails, the others are stopped, so nobody waits for the
# coordinator's heartbeat timeout. Exit status: the first non-zero one, else 0.
set -u

if [[ $# -lt 2 || ! "$1" =~ ^[0-9]+$ || "$1" -lt 1 ]]; then
  sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
num_processes=$1
shift

port=${JAX_COORDINATOR_PORT:-}
if [[ -z "$port" ]]; then
  port=$(python3 - <<'PY'
import socket
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    print(s.getsockname()[1])
PY
)
fi

pids=()
forward() {  # $1: signal name
  for pid in "${pids[@]}"; do kill -s "$1" "$pid" 2>/dev/null; done
}
trap 'forward TERM' TERM INT

for ((i = 0; i < num_processes; i++)); do
  gpus=()
  if [[ -n "${GPUS_PER_PROCESS:-}" ]]; then
    first=$((i * GPUS_PER_PROCESS))
    gpus=(CUDA_VISIBLE_DEVICES="$(seq -s, "$first" $((first + GPUS_PER_PROCESS - 1)))")
  fi
  # Started in the background by a script, each process ignores SIGINT (POSIX shells do
  # that without job control), so a Ctrl-C arrives once, through the trap above.
  env "${gpus[@]}" JAX_COORDINATOR_ADDRESS="127.0.0.1:${port}" \
    JAX_NUM_PROCESSES="$num_processes" JAX_PROCESS_ID="$i" "$@" &
  pids+=($!)
done

status=0
while ((${#pids[@]})); do
  wait -n 2>/dev/null  # returns when a child exits or a trapped signal arrives
  for idx in "${!pids[@]}"; do
    pid=${pids[$idx]}
    kill -0 "$pid" 2>/dev/null && continue
    wait "$pid"
    rc=$?
    unset 'pids[idx]'
    if ((rc != 0 && status == 0)); then
      status=$rc
      echo "local_multiprocess.sh: process $idx exited with status $rc; stopping the others" >&2
      forward KILL
    fi
  done
done
exit "$status"
