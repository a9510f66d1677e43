#!/usr/bin/env bash
# Usage: scripts/multihost_cpu.sh N [main.py args]
#
# A multi-process run on this machine, as on N hosts: N processes of main.py, each with
# $DEVICES_PER_PROCESS (default 4) CPU devices, joined through a coordinator on 127.0.0.1.
# Default: the tiny pretraining (--config=configs/pretrain.py:tiny --workdir=workdir/multihost);
# a --config= or --workdir= among the arguments replaces it. Process 0 prints progress and
# writes metrics; all processes write the checkpoints together.
# If a process fails, the others are stopped (SIGTERM, then SIGKILL after $GRACE_S seconds,
# default 10) and the script exits with that process's status. $LOG_DIR (optional): each
# process's output goes to $LOG_DIR/process_<i>.log instead of the terminal.
# Any bash >= 4 (with bash < 5.1, whose `wait` has no -p, it polls the processes every 0.2 s).
# See docs/multihost.md.
set -uo pipefail

if [[ $# -lt 1 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 N [main.py args]  (N: number of processes, >= 1)" >&2
  exit 2
fi
n=$1
shift
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
devices=${DEVICES_PER_PROCESS:-4}
grace=${GRACE_S:-10}

args=("$@")
[[ " ${args[*]-} " == *" --config="* ]] || args=(--config=configs/pretrain.py:tiny "${args[@]}")
[[ " ${args[*]} " == *" --workdir="* ]] || args=(--workdir=workdir/multihost "${args[@]}")

# A free port for the coordinator (asked of the OS, so parallel runs do not collide).
port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

pids=()
stop_all() {  # stop_all SIGNAL: the processes still running, then SIGKILL after the grace time
  local pid deadline=$((SECONDS + grace))
  for pid in "${pids[@]}"; do kill "-$1" "$pid" 2>/dev/null; done
  for pid in "${pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null
  done
}
trap 'echo "multihost_cpu: interrupted; stopping the processes" >&2; stop_all TERM; exit 130' INT TERM

for ((i = 0; i < n; i++)); do
  cmd=(env JAX_PLATFORMS=cpu
       "XLA_FLAGS=${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices"
       "$python" main.py --coordinator_address="127.0.0.1:$port" --num_processes="$n"
       --process_id="$i" "${args[@]}")
  if [[ -n ${LOG_DIR:-} ]]; then
    mkdir -p "$LOG_DIR"
    "${cmd[@]}" >"$LOG_DIR/process_$i.log" 2>&1 &
  else
    "${cmd[@]}" &
  fi
  pids+=($!)
done

# next_done: waits until one of "${running[@]}" exits; sets done_pid and rc (its status).
if ((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] >= 501)) && [[ -z ${MULTIHOST_POLL:-} ]]; then
  next_done() { wait -n -p done_pid "${running[@]}"; rc=$?; }
else  # bash < 5.1 (MULTIHOST_POLL=1 forces it): bash reaps an exited child at once, so
  # `kill -0` fails for it and `wait PID` then returns its saved status.
  next_done() {
    local pid
    while true; do
      for pid in "${running[@]}"; do
        if ! kill -0 "$pid" 2>/dev/null; then
          done_pid=$pid
          wait "$pid"
          rc=$?
          return
        fi
      done
      sleep 0.2
    done
  }
fi

# Wait for every process; the first failure stops the rest (a peer left alone would block in a
# collective until the coordinator's heartbeat timeout, minutes later).
status=0
running=("${pids[@]}")
for ((left = n; left > 0; left--)); do
  next_done
  rest=()  # the others (an exact match: a pattern would also cut pid 123 off 1234)
  for pid in "${running[@]}"; do [[ $pid == "$done_pid" ]] || rest+=("$pid"); done
  running=(${rest[@]+"${rest[@]}"})  # bash < 4.4 calls an empty array unbound under set -u
  if ((rc != 0)); then
    for ((i = 0; i < n; i++)); do [[ ${pids[i]} == "$done_pid" ]] && break; done
    echo "multihost_cpu: error: process $i of $n exited with status $rc; stopping the others" \
         "(its output: ${LOG_DIR:+$LOG_DIR/process_$i.log}${LOG_DIR:-above})" >&2
    stop_all TERM
    status=$rc
    break
  fi
done
exit "$status"
