#!/usr/bin/env bash
# Prints (or follows) the trainer's per-host logs on a TPU VM slice.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<EOF2
Usage: $PROG --name=NAME --zone=ZONE [--worker=W] [--lines=N] [--follow] [options]

Shows the last N lines of $REMOTE_LOG_DIR/train.log (written by launch/run.sh) on the chosen
workers, each line prefixed with its host name. Worker 0 runs process 0, the one that logs
metrics; the other workers' logs matter when a host fails.

Options:
  --worker=W    all, or worker indices like 0 or 0,3 [default: 0]
  --lines=N     how many lines from the end [default: 50]
  --follow, -f  keep printing new lines until Ctrl-C (training goes on)
$COMMON_OPTIONS_HELP
EOF2
}

WORKER=0
LINES=50
FOLLOW=0
while [[ $# -gt 0 ]]; do
  if parse_common_option "$@"; then shift "$OPT_SHIFT"; continue; fi
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --worker|--worker=*) opt_value "$@"; WORKER="$OPT_VALUE"; shift "$OPT_SHIFT" ;;
    --lines|--lines=*) opt_value "$@"; LINES="$OPT_VALUE"; shift "$OPT_SHIFT" ;;
    --follow|-f) FOLLOW=1; shift ;;
    *) die "unknown option '$1' (see $PROG --help)" ;;
  esac
done
check_common
check_worker "$WORKER"
[[ "$LINES" =~ ^[0-9]+$ ]] || die "bad --lines '$LINES': use a whole number like 100"

ARGS=("--lines=$LINES")
((FOLLOW)) && ARGS+=(--follow)
worker_ssh "$WORKER" logs "${ARGS[@]}"
