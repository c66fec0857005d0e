#!/usr/bin/env bash
# Runs N trainer processes on this machine, wired together with jax.distributed on CPU (gloo):
# the multi-host code path of a TPU pod, for debugging without one.
set -euo pipefail

PROG="$(basename "$0")"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  cat <<EOF
Usage: $PROG N [options] -- MAIN_FLAGS...

Starts N processes of
  python -m mambaout_jax.main MAIN_FLAGS --coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=i
on CPU (JAX_PLATFORMS=cpu, gloo collectives), i = 0..N-1. Process i writes to LOG_DIR/process_i.log;
process 0's log is also shown here. When one process fails, or on Ctrl-C, all of them are stopped.
Exits 0 when every process succeeded, otherwise with the first failure's exit status.

Options:
  --devices=K       fake CPU devices per process (xla_force_host_platform_device_count) [default: 1]
  --port=PORT       coordinator port [default: a free one]
  --log-dir=DIR     where process_i.log go [default: a new directory under \${TMPDIR:-/tmp}]
  --python=PYTHON   interpreter [default: \$PYTHON, else python3]
  --module=MODULE   entry point taking the same flags [default: mambaout_jax.main]
  -h, --help        show this help

Example (2 hosts x 4 devices, the demo config):
  $PROG 2 --devices=4 -- --config=configs/demo.py --workdir=/tmp/mambaout_2proc
EOF
}

die() {
  echo "$PROG: error: $*" >&2
  exit 2
}

((BASH_VERSINFO[0] > 5 || (BASH_VERSINFO[0] == 5 && BASH_VERSINFO[1] >= 1))) ||
  die "needs bash >= 5.1 (this is $BASH_VERSION)"

NUM=''
DEVICES=1
PORT=''
LOG_DIR=''
PYTHON="${PYTHON:-python3}"
MODULE=mambaout_jax.main
MAIN_FLAGS=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --devices=*) DEVICES="${1#*=}" ;;
    --port=*) PORT="${1#*=}" ;;
    --log-dir=*) LOG_DIR="${1#*=}" ;;
    --python=*) PYTHON="${1#*=}" ;;
    --module=*) MODULE="${1#*=}" ;;
    --) shift; MAIN_FLAGS=("$@"); break ;;
    -*) die "unknown option '$1'; flags for the trainer go after -- (see $PROG --help)" ;;
    *) [[ -z "$NUM" ]] || die "unexpected argument '$1'; flags for the trainer go after --"
       NUM="$1" ;;
  esac
  shift
done

[[ -n "$NUM" ]] || die "how many processes? usage: $PROG N -- MAIN_FLAGS (e.g. $PROG 2 -- --config=configs/demo.py --workdir=/tmp/run)"
[[ "$NUM" =~ ^[1-9][0-9]*$ && "$NUM" -le 64 ]] || die "bad process count '$NUM': use a whole number from 1 to 64"
[[ "$DEVICES" =~ ^[1-9][0-9]*$ ]] || die "bad --devices '$DEVICES': use a whole number >= 1"
[[ -z "$PORT" || ("$PORT" =~ ^[0-9]+$ && "$PORT" -ge 1024 && "$PORT" -le 65535) ]] ||
  die "bad --port '$PORT': use a free port from 1024 to 65535"
[[ "$MODULE" =~ ^[A-Za-z_][A-Za-z0-9_.]*$ ]] || die "bad --module '$MODULE': use a dotted module name"
command -v "$PYTHON" >/dev/null || die "no python '$PYTHON': pass --python=/path/to/venv/bin/python (or set PYTHON)"
for flag in ${MAIN_FLAGS[@]+"${MAIN_FLAGS[@]}"}; do
  case "$flag" in
    --coordinator_address*|--num_processes*|--process_id*)
      die "'${flag%%=*}' is set by $PROG for each process: drop it from the flags after --" ;;
  esac
done

if [[ -z "$PORT" ]]; then
  PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
if [[ -z "$LOG_DIR" ]]; then
  LOG_DIR="$(mktemp -d "${TMPDIR:-/tmp}/mambaout_local_XXXXXX")"
fi
mkdir -p "$LOG_DIR"

export JAX_PLATFORMS=cpu
export JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo
export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$DEVICES"
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

PIDS=()
TAIL_PID=''

# True while a process exists and is not a zombie (read from /proc: no fork per check).
is_alive() {
  local stat
  [[ -r "/proc/$1/stat" ]] && read -r stat <"/proc/$1/stat" 2>/dev/null || return 1
  stat="${stat##*) }"
  [[ "${stat%% *}" != Z ]]
}

# Stops every process still running: SIGTERM to its process group, SIGKILL after 10 s.
stop_all() {
  local pid alive deadline=$((SECONDS + 10))
  for pid in ${PIDS[@]+"${PIDS[@]}"}; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  while ((SECONDS < deadline)); do
    alive=0
    for pid in ${PIDS[@]+"${PIDS[@]}"}; do is_alive "$pid" && alive=1; done
    ((alive)) || break
    sleep 0.1
  done
  for pid in ${PIDS[@]+"${PIDS[@]}"}; do kill -KILL -- "-$pid" 2>/dev/null || true; done
  wait ${PIDS[@]+"${PIDS[@]}"} 2>/dev/null || true
  if [[ -n "$TAIL_PID" ]]; then kill "$TAIL_PID" 2>/dev/null || true; wait "$TAIL_PID" 2>/dev/null || true; fi
}

on_signal() {
  echo "$PROG: interrupted; stopping all $NUM processes" >&2
  trap - INT TERM
  stop_all
  exit 130
}
trap on_signal INT TERM

echo "$PROG: $NUM processes, coordinator 127.0.0.1:$PORT, logs in $LOG_DIR" >&2
for ((i = 0; i < NUM; i++)); do
  # setsid: each process leads its own process group, so stop_all reaches its children too.
  setsid "$PYTHON" -m "$MODULE" ${MAIN_FLAGS[@]+"${MAIN_FLAGS[@]}"} \
    "--coordinator_address=127.0.0.1:$PORT" "--num_processes=$NUM" "--process_id=$i" \
    >"$LOG_DIR/process_$i.log" 2>&1 </dev/null &
  PIDS+=($!)
done
# Shows process 0's log as it grows; exits by itself once process 0 has ended and all is shown.
tail -n +1 -F --pid="${PIDS[0]}" "$LOG_DIR/process_0.log" 2>/dev/null &
TAIL_PID=$!

declare -A INDEX RUNNING
for i in "${!PIDS[@]}"; do INDEX[${PIDS[$i]}]=$i; RUNNING[${PIDS[$i]}]=1; done
status=0
while ((${#RUNNING[@]} > 0)); do
  finished=''
  rc=0
  wait -n -p finished "${!RUNNING[@]}" || rc=$?
  [[ -n "$finished" ]] || continue
  unset "RUNNING[$finished]"
  if ((rc != 0)); then
    i="${INDEX[$finished]}"
    status=$rc
    echo "$PROG: process $i exited with status $rc; stopping the others. Last lines of $LOG_DIR/process_$i.log:" >&2
    tail -n 20 "$LOG_DIR/process_$i.log" | sed "s/^/  [process $i] /" >&2
    break
  fi
done
trap - INT TERM
if ((status == 0)); then
  wait "$TAIL_PID" || true
  TAIL_PID=''
fi
stop_all
if ((status == 0)); then
  echo "$PROG: all $NUM processes succeeded; logs in $LOG_DIR" >&2
fi
exit "$status"
