#!/usr/bin/env bash
# Run one command as N JAX processes on this machine (CPU devices), for testing multi-host code.
#
#   launch/local_multiprocess.sh NUM_PROCESSES DEVICES_PER_PROCESS COMMAND [ARGS...]
#   launch/local_multiprocess.sh 2 2 python -m llava_jax.train --config configs/demo.py --workdir runs/mp
#
# Each process gets JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (read by
# llava_jax.parallel.distributed.initialize) and DEVICES_PER_PROCESS fake CPU devices; collectives
# between processes go over gloo. Logs go to $LOG_DIR/process_<i>.log (default: a temp dir) and
# process 0's log is also streamed. Exits non-zero if any process fails, stopping the others.
set -euo pipefail
if [ "$#" -lt 3 ]; then
  sed -n '2,10p' "$0"; exit 2
fi
nproc_=$1; ndev=$2; shift 2
port=${COORDINATOR_PORT:-$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}
log_dir=${LOG_DIR:-$(mktemp -d)}
mkdir -p "$log_dir"
pids=()
for ((i = 0; i < nproc_; i++)); do
  JAX_COORDINATOR_ADDRESS="127.0.0.1:${port}" JAX_NUM_PROCESSES="$nproc_" JAX_PROCESS_ID="$i" \
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=${ndev}" \
    "$@" >"$log_dir/process_${i}.log" 2>&1 &
  pids+=($!)
done
tail -n +1 -f "$log_dir/process_0.log" --pid "${pids[0]}" &
tailer=$!
status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "process $i failed; log: $log_dir/process_${i}.log" >&2
    status=1
    kill "${pids[@]}" 2>/dev/null || true
  fi
done
wait "$tailer" 2>/dev/null || true
exit $status
