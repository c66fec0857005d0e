#!/usr/bin/env bash
# Keeps a training run alive on a spot / queued TPU slice: recreates the slice after a preemption
# and restarts the trainer, which resumes from the last checkpoint in --workdir.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
HERE="$(dirname "${BASH_SOURCE[0]}")"

usage() {
  cat <<EOF
Usage: $PROG --name=NAME --zone=ZONE --accelerator-type=TYPE [--spot] [--queued]
             --config=configs/FILE.py --workdir=gs://BUCKET/DIR [--data-dir=gs://...]
             [--watch=SECONDS] [options] [-- MAIN_FLAGS...]

Looks at the slice once (or every SECONDS with --watch) and does what the run needs:
  slice READY / ACTIVE, trainer running on every host    nothing
  slice READY / ACTIVE, trainer finished (exit 0)        nothing more; --watch stops
  slice READY / ACTIVE, trainer stopped or failed        launch/stop.sh, then launch/run.sh
  slice PREEMPTED / SUSPENDED / FAILED / gone             launch/delete.sh, create.sh, setup.sh,
    (gone: describe says NOT_FOUND)                      run.sh
  describe failed otherwise (credentials, network, 5xx)  nothing; --watch asks again, else exit 1
  slice being created or waiting in the queue            wait
launch/run.sh with the same --workdir resumes from the newest checkpoint, so a preemption costs
the steps since the last checkpoint plus the time to get a new slice.

Options: those of launch/create.sh (--accelerator-type, --runtime-version, --spot, --queued,
--reserved), launch/setup.sh (--repo, --ref, --python) and launch/run.sh (--config, --workdir,
--data-dir, --mode, and MAIN_FLAGS after --), plus
  --watch=SECONDS    check again every SECONDS until the trainer has finished
$COMMON_OPTIONS_HELP
With --dry-run it prints the check and the full recovery sequence (the state is not known then).
EOF
}

COMMON=()
CREATE=()
SETUP=()
RUN=()
QUEUED=0
WATCH=0
while [[ $# -gt 0 ]]; do
  if parse_common_option "$@"; then
    COMMON+=("${@:1:$OPT_SHIFT}")
    shift "$OPT_SHIFT"
    continue
  fi
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --watch|--watch=*) opt_value "$@"; WATCH="$OPT_VALUE"; shift "$OPT_SHIFT" ;;
    --queued) QUEUED=1; CREATE+=("$1"); shift ;;
    --spot|--reserved) CREATE+=("$1"); shift ;;
    --accelerator-type|--accelerator-type=*|--runtime-version|--runtime-version=*)
      opt_value "$@"; CREATE+=("${@:1:$OPT_SHIFT}"); shift "$OPT_SHIFT" ;;
    --repo|--repo=*|--ref|--ref=*|--python|--python=*)
      opt_value "$@"; SETUP+=("${@:1:$OPT_SHIFT}"); shift "$OPT_SHIFT" ;;
    --config|--config=*|--workdir|--workdir=*|--data-dir|--data-dir=*|--mode|--mode=*)
      opt_value "$@"; RUN+=("${@:1:$OPT_SHIFT}"); shift "$OPT_SHIFT" ;;
    --) RUN+=("$@"); break ;;
    *) die "unknown option '$1'; flags for the trainer go after -- (see $PROG --help)" ;;
  esac
done

check_common
[[ "$WATCH" =~ ^[0-9]+$ ]] || die "bad --watch '$WATCH': use a number of seconds like 600"
# Every step's own checks, up front: a typo fails now, not after a preemption hours later.
validate() {
  local name="$1" err
  shift
  if ! err="$(bash "$HERE/$name.sh" "${COMMON[@]}" --dry-run "$@" 2>&1 >/dev/null)"; then
    echo "${err/#$name.sh: error:/$PROG: error:}" >&2
    exit 2
  fi
}
validate create ${CREATE[@]+"${CREATE[@]}"}
validate setup ${SETUP[@]+"${SETUP[@]}"}
validate run ${RUN[@]+"${RUN[@]}"}

step() {
  local name="$1"
  shift
  ((DRY_RUN)) || echo "$PROG: $(date -u +%FT%TZ) launch/$name.sh" >&2
  bash "$HERE/$name.sh" "${COMMON[@]}" "$@"
}

recreate() {
  local delete=(--yes)
  ((QUEUED)) && delete+=(--queued)
  step delete "${delete[@]}" || true  # fails when the slice is already gone
  step create ${CREATE[@]+"${CREATE[@]}"} || return 3
  if ((QUEUED && !DRY_RUN)); then
    return 1  # set up and run once the queued resource is ACTIVE (a later check)
  fi
  step setup ${SETUP[@]+"${SETUP[@]}"} || return 3
  step run ${RUN[@]+"${RUN[@]}"} || return 3
  return 1
}

# The slice's state, MISSING only when gcloud says NOT_FOUND, UNKNOWN when describe failed for any
# other reason (expired credentials, network, an API error): a healthy slice must not be deleted
# because the question could not be asked.
slice_state() {
  local state err rc=0
  err="$(mktemp "${TMPDIR:-/tmp}/relaunch_describe_XXXXXX")"
  if ((QUEUED)); then
    state="$(gcloud_run compute tpus queued-resources describe "$NAME" "--zone=$ZONE" \
      '--format=value(state.state)' 2>"$err")" || rc=$?
  else
    state="$(gcloud_run compute tpus tpu-vm describe "$NAME" "--zone=$ZONE" \
      '--format=value(state)' 2>"$err")" || rc=$?
  fi
  if ((rc != 0)); then
    if grep -q 'NOT_FOUND' "$err"; then
      state=MISSING
    else
      echo "$PROG: could not read the state of $NAME (gcloud exited with status $rc): $(tail -n 1 "$err")" >&2
      state=UNKNOWN
    fi
  fi
  rm -f "$err"
  echo "${state:-UNKNOWN}"
}

# One check: returns 0 when the trainer has finished, 1 when it runs or is being brought back, and
# 3 when a step failed (e.g. no capacity for a new slice) or the state could not be read: a later
# check tries again.
check_once() {
  local state status hosts running done_ok
  state="$(slice_state)"
  echo "$PROG: $(date -u +%FT%TZ) slice $NAME is $state" >&2
  case "$state" in
    READY|ACTIVE)
      if ! status="$(worker_ssh all status)"; then
        echo "$PROG: workers not set up; setting up and starting the run" >&2
        step setup ${SETUP[@]+"${SETUP[@]}"} || return 3
        step run ${RUN[@]+"${RUN[@]}"} || return 3
        return 1
      fi
      echo "$status" >&2
      hosts="$(grep -c ': \(running\|exited\|not running\)' <<<"$status" || true)"
      running="$(grep -c ': running (pid' <<<"$status" || true)"
      done_ok="$(grep -c ': exited with status 0;' <<<"$status" || true)"
      if ((hosts > 0 && done_ok == hosts)); then
        echo "$PROG: the trainer finished on every host" >&2
        return 0
      elif ((hosts > 0 && running == hosts)); then
        return 1
      fi
      echo "$PROG: the trainer is not running on every host; restarting it (it resumes from the workdir)" >&2
      step stop --timeout=60 || return 3
      step run ${RUN[@]+"${RUN[@]}"} || return 3
      ;;
    PREEMPTED|TERMINATED|STOPPED|SUSPENDED|SUSPENDING|FAILED|MISSING)
      echo "$PROG: recreating the slice" >&2
      recreate
      return $?
      ;;
    UNKNOWN)
      echo "$PROG: leaving the slice alone; a later check asks again" >&2
      return 3
      ;;
    *) echo "$PROG: waiting (state $state)" >&2 ;;
  esac
  return 1
}

if ((DRY_RUN)); then
  echo "# check: the slice's state, then (READY / ACTIVE) the trainer on every worker:"
  if ((QUEUED)); then
    gcloud_run compute tpus queued-resources describe "$NAME" "--zone=$ZONE" '--format=value(state.state)'
  else
    gcloud_run compute tpus tpu-vm describe "$NAME" "--zone=$ZONE" '--format=value(state)'
  fi
  worker_ssh all status
  echo "# the trainer stopped or failed on a READY slice:"
  step stop --timeout=60
  step run ${RUN[@]+"${RUN[@]}"}
  echo "# the slice was preempted or is gone:"
  recreate || true
  exit 0
fi

while :; do
  rc=0
  check_once || rc=$?
  ((rc == 0)) && exit 0
  if ((WATCH == 0)); then
    ((rc == 3)) && exit 1
    exit 0
  fi
  ((rc == 3)) && echo "$PROG: a step failed; trying again in ${WATCH}s" >&2
  sleep "$WATCH"
done
