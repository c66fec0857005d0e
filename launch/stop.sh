#!/usr/bin/env bash
# Stops the trainer on every worker of a TPU VM slice (the slice itself keeps running).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<EOF2
Usage: $PROG --name=NAME --zone=ZONE [--timeout=SECONDS] [options]

Sends SIGTERM to the trainer started by launch/run.sh on every worker (its whole process group,
data loader workers included), waits up to --timeout seconds for it to exit, then SIGKILLs what is
left. The trainer treats SIGTERM like a preemption notice and saves a checkpoint first, so a later
launch/run.sh with the same --workdir resumes from where it stopped. The slice keeps running (and
costing): delete it with launch/delete.sh.

Options:
  --timeout=S   seconds to wait after SIGTERM before SIGKILL [default: 120]
  --worker=W    all, or worker indices like 0 or 0,3 [default: all]
$COMMON_OPTIONS_HELP
EOF2
}

TIMEOUT=120
WORKER=all
while [[ $# -gt 0 ]]; do
  if parse_common_option "$@"; then shift "$OPT_SHIFT"; continue; fi
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --timeout|--timeout=*) opt_value "$@"; TIMEOUT="$OPT_VALUE"; shift "$OPT_SHIFT" ;;
    --worker|--worker=*) opt_value "$@"; WORKER="$OPT_VALUE"; shift "$OPT_SHIFT" ;;
    *) die "unknown option '$1' (see $PROG --help)" ;;
  esac
done
check_common
check_worker "$WORKER"
[[ "$TIMEOUT" =~ ^[0-9]+$ ]] || die "bad --timeout '$TIMEOUT': use a whole number of seconds like 120"

worker_ssh "$WORKER" stop "--timeout=$TIMEOUT"
