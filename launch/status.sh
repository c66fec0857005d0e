#!/usr/bin/env bash
# Shows the state of a TPU VM slice and, on every worker, whether the trainer runs and its last line.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<EOF2
Usage: $PROG --name=NAME --zone=ZONE [--queued] [--no-workers] [options]

Prints the slice's state and health (READY, CREATING, PREEMPTED, ...; with --queued the queued
resource's state: WAITING_FOR_RESOURCES, ACTIVE, SUSPENDED, ...), then asks every worker whether
the trainer started by launch/run.sh is still running and prints the last line of its log.
A PREEMPTED slice has lost its workers: recreate it (launch/delete.sh, launch/create.sh,
launch/setup.sh) and run launch/run.sh again with the same --workdir to resume.

Options:
  --queued        the slice was created with launch/create.sh --queued
  --no-workers    only the slice's state, no ssh to the workers
  --worker=W      all, or worker indices like 0 or 0,3 [default: all]
$COMMON_OPTIONS_HELP
EOF2
}

QUEUED=0
WORKERS=1
WORKER=all
while [[ $# -gt 0 ]]; do
  if parse_common_option "$@"; then shift "$OPT_SHIFT"; continue; fi
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --queued) QUEUED=1; shift ;;
    --no-workers) WORKERS=0; shift ;;
    --worker|--worker=*) opt_value "$@"; WORKER="$OPT_VALUE"; shift "$OPT_SHIFT" ;;
    *) die "unknown option '$1' (see $PROG --help)" ;;
  esac
done
check_common
check_worker "$WORKER"

if ((QUEUED)); then
  gcloud_run compute tpus queued-resources describe "$NAME" "--zone=$ZONE" \
    '--format=table(name.basename(),state.state,tpu.nodeSpec[0].node.acceleratorType)'
fi
if ! gcloud_run compute tpus tpu-vm describe "$NAME" "--zone=$ZONE" \
  '--format=table(name.basename(),state,health,acceleratorType,runtimeVersion)'; then
  echo "$PROG: no TPU VM '$NAME' in $ZONE$( ((QUEUED)) && echo ' yet: the queued resource has not been served')" >&2
  ((QUEUED)) && exit 0
  exit 1
fi

((WORKERS)) || exit 0
worker_ssh "$WORKER" status
