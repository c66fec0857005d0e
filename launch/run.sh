#!/usr/bin/env bash
# Starts the trainer on every worker of a TPU VM slice, detached, one log per host.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<EOF
Usage: $PROG --name=NAME --zone=ZONE --config=configs/FILE.py --workdir=gs://BUCKET/DIR
             [--data-dir=gs://BUCKET/tensorflow_datasets] [options] [-- MAIN_FLAGS...]

Runs on every worker at once (--worker=all):
  python -m mambaout_jax.main --config=CONFIG --workdir=WORKDIR [--config.dataset.data_dir=DATA_DIR] MAIN_FLAGS
in $REMOTE_DIR with its venv, detached from the ssh session (nohup + setsid: a dropped
connection does not stop training). Each host appends to its own log, $REMOTE_LOG_DIR/train.log,
and keeps the trainer's pid in $REMOTE_LOG_DIR/train.pid; launch/logs.sh and launch/status.sh
read them, launch/stop.sh stops the run. jax.distributed finds the other hosts by itself on a pod.

Checkpoints and metrics go to WORKDIR, which every host must share (GCS). Running the same command
again (after launch/stop.sh, a crash or a preemption and a recreated slice) resumes from the
latest checkpoint in WORKDIR. A host where the trainer is still running refuses to start a
second one.

Options:
  --config=FILE          config file, relative to the repository root (FILE.py or FILE.py:ARG)
  --workdir=gs://...     checkpoints, metrics.jsonl, exports; shared by all hosts
  --data-dir=gs://...    TFDS data dir holding the prepared dataset (sets config.dataset.data_dir)
  --mode=MODE            train (train and evaluate), eval or export [default: train]
  --worker=W             all, or worker indices like 0 or 0,3 [default: all]
$COMMON_OPTIONS_HELP

Everything after -- goes to mambaout_jax.main as it is, e.g. config overrides. Quote each one as
one shell word; it reaches the trainer as that one word, spaces and all:
  $PROG --name=mo-v4 --zone=us-central2-b --config=configs/tiny.py \\
      --workdir=gs://my-bucket/mambaout/tiny --data-dir=gs://my-bucket/tensorflow_datasets \\
      -- --config.batch_size=4096 '--config.aug.randaugment=rand-m9-mstd0.5-inc1'
EOF
}

CONFIG=''
WORKDIR=''
DATA_DIR=''
MODE=train
WORKER=all
MAIN_FLAGS=()

while [[ $# -gt 0 ]]; do
  if parse_common_option "$@"; then shift "$OPT_SHIFT"; continue; fi
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --config|--config=*) opt_value "$@"; CONFIG="$OPT_VALUE"; shift "$OPT_SHIFT" ;;
    --workdir|--workdir=*) opt_value "$@"; WORKDIR="$OPT_VALUE"; shift "$OPT_SHIFT" ;;
    --data-dir|--data-dir=*) opt_value "$@"; DATA_DIR="$OPT_VALUE"; shift "$OPT_SHIFT" ;;
    --mode|--mode=*) opt_value "$@"; MODE="$OPT_VALUE"; shift "$OPT_SHIFT" ;;
    --worker|--worker=*) opt_value "$@"; WORKER="$OPT_VALUE"; shift "$OPT_SHIFT" ;;
    --) shift; MAIN_FLAGS=("$@"); break ;;
    *) die "unknown option '$1'; flags for the trainer go after -- (see $PROG --help)" ;;
  esac
done

check_common
check_worker "$WORKER"
[[ -n "$CONFIG" ]] || die "no config: pass --config=configs/NAME.py (e.g. configs/tiny.py)"
CONFIG_FILE="${CONFIG%%:*}"
[[ "$CONFIG_FILE" != /* ]] || die "--config '$CONFIG' is absolute: give it relative to the repository root, e.g. configs/tiny.py"
[[ "$CONFIG_FILE" == *.py ]] || die "--config '$CONFIG' is not a .py config file: pass e.g. configs/tiny.py"
[[ -f "$REPO_ROOT/$CONFIG_FILE" ]] || die "no config file $CONFIG_FILE in $REPO_ROOT: pick one of: $(cd "$REPO_ROOT" && ls configs/*.py 2>/dev/null | tr '\n' ' ')"
[[ -n "$WORKDIR" ]] || die "no workdir: pass --workdir=gs://BUCKET/PATH (shared by all hosts; re-runs resume from it)"
[[ "$WORKDIR" =~ ^gs://[a-z0-9][-_.a-z0-9]*[a-z0-9](/.*)?$ ]] ||
  die "--workdir '$WORKDIR' is not a gs:// path with a valid bucket name (3-63 chars: a-z 0-9 - _ .): every host writes checkpoints there, so use --workdir=gs://BUCKET/PATH"
[[ -z "$DATA_DIR" || "$DATA_DIR" =~ ^gs://[a-z0-9][-_.a-z0-9]*[a-z0-9](/.*)?$ || "$DATA_DIR" == /* ]] ||
  die "--data-dir '$DATA_DIR' must be gs://BUCKET/PATH (or an absolute path present on every worker)"
[[ "$MODE" =~ ^(train|eval|export)$ ]] || die "bad --mode '$MODE': use train, eval or export"
for flag in ${MAIN_FLAGS[@]+"${MAIN_FLAGS[@]}"}; do
  case "$flag" in
    --workdir=*|--config=*|--mode=*|--coordinator_address=*|--num_processes=*|--process_id=*)
      die "'${flag%%=*}' after -- clashes with what $PROG sets; use $PROG's own option (pods find their peers by themselves)" ;;
  esac
done

TRAIN_CMD=(venv/bin/python -m mambaout_jax.main "--config=$CONFIG" "--workdir=$WORKDIR" "--mode=$MODE")
[[ -n "$DATA_DIR" ]] && TRAIN_CMD+=("--config.dataset.data_dir=$DATA_DIR")
TRAIN_CMD+=(${MAIN_FLAGS[@]+"${MAIN_FLAGS[@]}"})

worker_ssh "$WORKER" start -- "${TRAIN_CMD[@]}"
