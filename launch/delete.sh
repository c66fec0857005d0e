#!/usr/bin/env bash
# Deletes a TPU VM slice (and its queued resource). Checkpoints on GCS are not touched.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<EOF2
Usage: $PROG --name=NAME --zone=ZONE [--queued] [--yes] [options]

Deletes the slice; its disks, code, venv and local logs go with it. The --workdir on GCS (checkpoints,
metrics, exports) stays, so a new slice can resume the run. With --queued the queued resource is
deleted together with its TPU VM (--force).

Options:
  --queued   the slice was created with launch/create.sh --queued
  --yes      do not ask gcloud for confirmation (--quiet)
$COMMON_OPTIONS_HELP
EOF2
}

QUEUED=0
YES=0
while [[ $# -gt 0 ]]; do
  if parse_common_option "$@"; then shift "$OPT_SHIFT"; continue; fi
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --queued) QUEUED=1; shift ;;
    --yes|-y) YES=1; shift ;;
    *) die "unknown option '$1' (see $PROG --help)" ;;
  esac
done
check_common

QUIET=()
((YES)) && QUIET=(--quiet)
if ((QUEUED)); then
  gcloud_run compute tpus queued-resources delete "$NAME" "--zone=$ZONE" --force ${QUIET[@]+"${QUIET[@]}"}
else
  gcloud_run compute tpus tpu-vm delete "$NAME" "--zone=$ZONE" ${QUIET[@]+"${QUIET[@]}"}
fi
