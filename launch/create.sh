#!/usr/bin/env bash
# Creates a Cloud TPU VM slice: on-demand, spot, or through a queued resource.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<EOF
Usage: $PROG --name=NAME --zone=ZONE --accelerator-type=TYPE [options] [-- EXTRA_GCLOUD_FLAGS...]

Creates a TPU VM slice with gcloud. Without --queued the request is served now or fails
(\`gcloud compute tpus tpu-vm create\`); with --queued it waits in the Cloud TPU queue until capacity
frees up (\`gcloud compute tpus queued-resources create\`; the queued resource and the TPU VM share
NAME). --spot asks for cheaper, preemptible capacity in either mode.

Options:
  --accelerator-type=TYPE  slice type: v4-32, v5litepod-16, v5p-64, v6e-64, v3-8, ...
  --runtime-version=VER    TPU VM image [default by generation: v2/v3/v4 tpu-ubuntu2204-base,
                           v5litepod v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e]
  --spot                   spot capacity (preemptible; re-run launch/run.sh to resume)
  --queued                 request through a queued resource (waits for capacity)
  --valid-until=DURATION   with --queued: give up if not served within DURATION (e.g. 6h, 2d)
  --reserved               use the project's reserved capacity
$COMMON_OPTIONS_HELP

Everything after -- is passed to gcloud unchanged (e.g. -- --network=my-net --internal-ips).

Examples:
  $PROG --name=mo-v4 --zone=us-central2-b --accelerator-type=v4-32
  $PROG --name=mo-v5e --zone=us-west4-a --accelerator-type=v5litepod-16 --spot --queued --dry-run
EOF
}

ACCELERATOR_TYPE=''
RUNTIME_VERSION=''
SPOT=0
QUEUED=0
RESERVED=0
VALID_UNTIL=''
EXTRA=()

while [[ $# -gt 0 ]]; do
  if parse_common_option "$@"; then shift "$OPT_SHIFT"; continue; fi
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --accelerator-type|--accelerator-type=*) opt_value "$@"; ACCELERATOR_TYPE="$OPT_VALUE"; shift "$OPT_SHIFT" ;;
    --runtime-version|--runtime-version=*) opt_value "$@"; RUNTIME_VERSION="$OPT_VALUE"; shift "$OPT_SHIFT" ;;
    --valid-until|--valid-until=*) opt_value "$@"; VALID_UNTIL="$OPT_VALUE"; shift "$OPT_SHIFT" ;;
    --spot) SPOT=1; shift ;;
    --queued) QUEUED=1; shift ;;
    --reserved) RESERVED=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown option '$1' (see $PROG --help)" ;;
  esac
done

check_common
[[ -n "$ACCELERATOR_TYPE" ]] || die "no slice type: pass --accelerator-type=TYPE, e.g. v4-32 or v5litepod-16"
[[ "$ACCELERATOR_TYPE" =~ ^v[0-9]+[a-z]*-[0-9]+$ ]] ||
  die "bad --accelerator-type '$ACCELERATOR_TYPE': expected GENERATION-CORES like v4-32, v5litepod-16, v6e-64"
if [[ -z "$RUNTIME_VERSION" ]]; then
  case "$ACCELERATOR_TYPE" in
    v2-*|v3-*|v4-*) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
    v5litepod-*|v5e-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
    *) die "no default runtime for '$ACCELERATOR_TYPE': pass --runtime-version=VER (see gcloud compute tpus tpu-vm versions list --zone=$ZONE)" ;;
  esac
fi
[[ -z "$VALID_UNTIL" || "$QUEUED" == 1 ]] || die "--valid-until only applies to queued resources: add --queued"
[[ -z "$VALID_UNTIL" || "$VALID_UNTIL" =~ ^[0-9]+[smhd]$ ]] ||
  die "bad --valid-until '$VALID_UNTIL': use a duration like 90m, 6h or 2d"
((SPOT && RESERVED)) && die "--spot and --reserved exclude each other: pick one"

FLAGS=("--zone=$ZONE" "--accelerator-type=$ACCELERATOR_TYPE")
((SPOT)) && FLAGS+=(--spot)
((RESERVED)) && FLAGS+=(--reserved)
if ((QUEUED)); then
  FLAGS+=("--node-id=$NAME" "--runtime-version=$RUNTIME_VERSION")
  [[ -n "$VALID_UNTIL" ]] && FLAGS+=("--valid-until-duration=$VALID_UNTIL")
  gcloud_run compute tpus queued-resources create "$NAME" "${FLAGS[@]}" "${EXTRA[@]}"
  if ((!DRY_RUN)); then
    echo "$PROG: queued '$NAME'; launch/status.sh --name=$NAME --zone=$ZONE --queued shows when it is ACTIVE"
  fi
else
  FLAGS+=("--version=$RUNTIME_VERSION")
  gcloud_run compute tpus tpu-vm create "$NAME" "${FLAGS[@]}" "${EXTRA[@]}"
fi
