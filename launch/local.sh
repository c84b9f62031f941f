#!/usr/bin/env bash
# Run one command as N processes of one multi-process JAX run on this machine.
#
#   launch/local.sh [-n N] [--port PORT] [--cpu-devices K] [--log-dir DIR] -- COMMAND [ARGS...]
#
# Each process gets VIMPAC_COORDINATOR=127.0.0.1:PORT, VIMPAC_NUM_PROCESSES=N and its own
# VIMPAC_PROCESS_ID (read by vimpac_jax.runtime.distributed.maybe_initialize). --cpu-devices K
# makes each process a CPU "host" with K devices (JAX_PLATFORMS=cpu, XLA_FLAGS), for trying a
# multi-host run without accelerators. Output goes to DIR/process_<i>.log with --log-dir, else
# to this terminal. When any process fails the others are stopped (they would otherwise wait
# for it in a collective) and the first failure's exit status is returned.
#
# Example: launch/local.sh -n 2 --cpu-devices 4 -- vimpac train --config configs/pretrain.py:runlocal \
#            --config.data.train_store=STORE --workdir /tmp/run
set -euo pipefail

num=2 port="" cpu_devices="" log_dir=""
usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n|--num-processes) num="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --cpu-devices) cpu_devices="$2"; shift 2 ;;
    --log-dir) log_dir="$2"; shift 2 ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "local.sh: unknown option $1 (the command goes after --)" >&2; usage ;;
  esac
done
[[ $# -gt 0 ]] || { echo "local.sh: no command given after --" >&2; usage; }
[[ "$num" =~ ^[1-9][0-9]*$ ]] || { echo "local.sh: -n must be a positive integer, got '$num'" >&2; exit 2; }
if [[ -z "$port" ]]; then
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
[[ -n "$log_dir" ]] && mkdir -p "$log_dir"

export VIMPAC_COORDINATOR="127.0.0.1:${port}" VIMPAC_NUM_PROCESSES="$num"
if [[ -n "$cpu_devices" ]]; then
  export JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=${cpu_devices} ${XLA_FLAGS:-}"
fi
echo "local.sh: $num processes, coordinator $VIMPAC_COORDINATOR: $*" >&2

pids=()
for ((i = 0; i < num; i++)); do
  if [[ -n "$log_dir" ]]; then
    VIMPAC_PROCESS_ID=$i "$@" >"$log_dir/process_$i.log" 2>&1 &
  else
    VIMPAC_PROCESS_ID=$i "$@" &
  fi
  pids+=($!)
done

status=0
stop_all() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap 'stop_all; exit 130' INT TERM
for ((left = num; left > 0; left--)); do
  rc=0
  wait -n || rc=$?
  if [[ $rc -ne 0 && $status -eq 0 ]]; then
    status=$rc
    echo "local.sh: a process exited with status $rc; stopping the others" >&2
    stop_all
  fi
done
exit "$status"
