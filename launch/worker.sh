#!/usr/bin/env bash
# Runs ON a TPU VM worker (launch/*.sh call it over ssh); works the same on any Linux machine.
set -euo pipefail

PROG="$(basename "$0")"
CODE_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOG_DIR="${MAMBAOUT_LOG_DIR:-$HOME/mambaout_jax_logs}"
LOG="$LOG_DIR/train.log"
PID_FILE="$LOG_DIR/train.pid"
EXIT_FILE="$LOG_DIR/train.exit"
HOST="$(hostname)"

usage() {
  cat <<EOF
Usage: $PROG COMMAND [options]

The worker side of the launch/ scripts. Commands:
  setup [--python=3.11]       make $CODE_DIR/venv with uv and install requirements.txt plus
                              jax[tpu] at the jax version requirements.txt pins
  start -- PROGRAM [ARGS...]  start PROGRAM detached (setsid + nohup: survives the ssh session)
                              in $CODE_DIR, appending its output to $LOG; refuses to start a
                              second one while the first still runs
  status                      running, or the exit status it ended with, and the last log line
  logs [--lines=N] [--follow] the last N lines of the log [default: 50], each prefixed with the host
  stop [--timeout=S]          SIGTERM to the program's process group, SIGKILL after S seconds
                              [default: 120]
Logs and the pid file live in \$MAMBAOUT_LOG_DIR [default: \$HOME/mambaout_jax_logs].
EOF
}

die() {
  echo "$HOST: $PROG: error: $*" >&2
  exit 2
}

running_pid() {
  local pid
  pid="$(cat "$PID_FILE" 2>/dev/null || true)"
  if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then echo "$pid"; fi
}

cmd_setup() {
  local python=3.11 jax uv
  for arg in "$@"; do
    case "$arg" in
      --python=*) python="${arg#*=}" ;;
      *) die "setup: unknown option '$arg' (only --python=VERSION)" ;;
    esac
  done
  cd "$CODE_DIR"
  [[ -f requirements.txt ]] || die "no requirements.txt in $CODE_DIR: copy the code first (launch/setup.sh)"
  jax="$(sed -n 's/^jax==\([0-9][0-9.]*\).*/\1/p' requirements.txt | head -n 1)"
  [[ -n "$jax" ]] || die "requirements.txt pins no jax==VERSION"
  if ! command -v uv >/dev/null && [[ ! -x "$HOME/.local/bin/uv" ]]; then
    python3 -m pip install --quiet --user uv 2>/dev/null ||
      python3 -m pip install --quiet --user --break-system-packages uv 2>/dev/null ||
      curl -LsSf https://astral.sh/uv/install.sh | env UV_INSTALL_DIR="$HOME/.local/bin" sh
  fi
  uv="$(command -v uv || echo "$HOME/.local/bin/uv")"
  [[ -x venv/bin/python ]] || "$uv" venv --quiet --python "$python" venv
  "$uv" pip install --quiet --python venv/bin/python -r requirements.txt "jax[tpu]==$jax"
  venv/bin/python -c 'import jax, mambaout_jax; print("jax", jax.__version__, "ready")' |
    sed "s/^/$HOST: /"
}

cmd_start() {
  [[ "${1:-}" == -- ]] || die "start: usage: $PROG start -- PROGRAM [ARGS...]"
  shift
  [[ $# -gt 0 ]] || die "start: no program given after --"
  cd "$CODE_DIR"
  if [[ "$1" == */* && ! -x "$1" ]]; then
    die "start: $1 is missing in $CODE_DIR: run launch/setup.sh first"
  fi
  mkdir -p "$LOG_DIR"
  local pid
  pid="$(running_pid)"
  [[ -z "$pid" ]] || die "already running (pid $pid): stop it first with launch/stop.sh"
  {
    echo "==== $(date -u +%FT%TZ) $HOST start in $CODE_DIR"
    printf '%q ' "$@"
    echo
  } >>"$LOG"
  rm -f "$EXIT_FILE"
  # setsid: own session and process group (stop.sh signals the whole group, and a dropped ssh
  # connection's SIGHUP does not reach it); nohup for good measure. The wrapping shell records
  # the exit status (its TERM trap only defers it until the program has exited).
  nohup setsid bash -c 'trap true TERM INT; "$@"; rc=$?
    echo "$rc" >"$0"; echo "==== $(date -u +%FT%TZ) exited with status $rc"; exit "$rc"' \
    "$EXIT_FILE" "$@" >>"$LOG" 2>&1 </dev/null &
  echo $! >"$PID_FILE"
  echo "$HOST: started pid $!, log $LOG"
}

cmd_status() {
  local pid state last
  pid="$(running_pid)"
  if [[ -n "$pid" ]]; then
    state="running (pid $pid)"
  elif [[ -f "$EXIT_FILE" ]]; then
    state="exited with status $(cat "$EXIT_FILE")"
  else
    state='not running'
  fi
  last="$(tail -n 1 "$LOG" 2>/dev/null || echo '(no log yet)')"
  echo "$HOST: $state; last log line: $last"
}

cmd_logs() {
  local lines=50 follow=()
  for arg in "$@"; do
    case "$arg" in
      --lines=*) lines="${arg#*=}" ;;
      --follow|-f) follow=(-F) ;;
      *) die "logs: unknown option '$arg' (--lines=N, --follow)" ;;
    esac
  done
  [[ "$lines" =~ ^[0-9]+$ ]] || die "logs: bad --lines '$lines': use a whole number"
  if [[ ! -f "$LOG" ]]; then
    echo "$HOST: no log yet in $LOG_DIR; start a run with launch/run.sh"
    return 0
  fi
  tail -n "$lines" ${follow[@]+"${follow[@]}"} "$LOG" | sed -u "s/^/[$HOST] /"
}

cmd_stop() {
  local timeout=120 pid i
  for arg in "$@"; do
    case "$arg" in
      --timeout=*) timeout="${arg#*=}" ;;
      *) die "stop: unknown option '$arg' (only --timeout=SECONDS)" ;;
    esac
  done
  [[ "$timeout" =~ ^[0-9]+$ ]] || die "stop: bad --timeout '$timeout': use whole seconds"
  pid="$(running_pid)"
  if [[ -z "$pid" ]]; then
    echo "$HOST: not running"
    rm -f "$PID_FILE"
    return 0
  fi
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
  for ((i = 0; i < timeout * 10; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid"
    for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    echo "$HOST: killed pid $pid (still running ${timeout}s after SIGTERM)"
  else
    echo "$HOST: stopped pid $pid"
  fi
  echo "==== $(date -u +%FT%TZ) $HOST stopped by launch/stop.sh" >>"$LOG"
  rm -f "$PID_FILE"
}

[[ $# -gt 0 ]] || { usage >&2; exit 2; }
command="$1"
shift
case "$command" in
  -h|--help) usage ;;
  setup) cmd_setup "$@" ;;
  start) cmd_start "$@" ;;
  status) cmd_status "$@" ;;
  logs) cmd_logs "$@" ;;
  stop) cmd_stop "$@" ;;
  *) die "unknown command '$command': use setup, start, status, logs or stop" ;;
esac
