# shellcheck shell=bash disable=SC2034,SC2088  # variables are used by the sourcing scripts; ~ expands remotely
# Shared helpers for the launch/ scripts. Sourced, not executed.
#
# Every script prints the exact commands it runs with `--dry-run` (one per line, quoted so that
# pasting the line into bash runs the same argv), and checks its arguments before touching gcloud.

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PROG="$(basename "$0")"

# Where the code (with its venv) and the logs live on every TPU VM worker; launch/worker.sh does
# the work there.
REMOTE_DIR='~/mambaout_jax'
REMOTE_LOG_DIR='~/mambaout_jax_logs'

DRY_RUN=0
NAME="${TPU_NAME:-}"
ZONE="${TPU_ZONE:-}"
PROJECT="${GCP_PROJECT:-}"

die() {
  echo "$PROG: error: $*" >&2
  exit 2
}

# Quotes one word for bash: plain words stay as they are, others are single-quoted, and words with
# a newline or tab use $'...' so that every command prints on one line.
shell_quote() {
  local s="$1"
  if [[ -n "$s" && "$s" =~ ^[A-Za-z0-9_./:=@%+,^-]+$ ]]; then
    printf '%s' "$s"
  elif [[ "$s" == *$'\n'* || "$s" == *$'\t'* ]]; then
    s="${s//\\/\\\\}"
    s="${s//\'/\\\'}"
    s="${s//$'\n'/\\n}"
    s="${s//$'\t'/\\t}"
    printf "\$'%s'" "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

# Quotes every argument and joins them with spaces: `bash -c "$(shell_join "$@")"` runs "$@".
shell_join() {
  local out='' word
  for word in "$@"; do
    out+="${out:+ }$(shell_quote "$word")"
  done
  printf '%s' "$out"
}

# Runs a command, or prints it (quoted, one line) under --dry-run.
run() {
  if ((DRY_RUN)); then
    shell_join "$@"
    echo
  else
    "$@"
  fi
}

# gcloud with --project appended when one was given (otherwise gcloud's configured project).
gcloud_run() {
  if [[ -n "$PROJECT" ]]; then
    run gcloud "$@" "--project=$PROJECT"
  else
    run gcloud "$@"
  fi
}

# Runs a bash script on TPU VM workers ('all' or an index) over `gcloud ... tpu-vm ssh`.
tpu_ssh() {
  local worker="$1" script="$2"
  gcloud_run compute tpus tpu-vm ssh "$NAME" "--zone=$ZONE" "--worker=$worker" \
    "--command=$script"
}

# Runs `bash launch/worker.sh ARGS...` in the code directory of TPU VM workers.
worker_ssh() {
  local worker="$1"
  shift
  tpu_ssh "$worker" "cd $REMOTE_DIR && bash launch/worker.sh $(shell_join "$@")"
}

# Option parsing: `--key=value` or `--key value`. Sets OPT_VALUE and OPT_SHIFT (1 or 2).
# Usage:  --name|--name=*) opt_value "$@"; NAME="$OPT_VALUE"; shift "$OPT_SHIFT" ;;
opt_value() {
  if [[ "$1" == *=* ]]; then
    OPT_VALUE="${1#*=}"
    OPT_SHIFT=1
  else
    [[ $# -ge 2 && "$2" != --* ]] || die "$1 needs a value: $1=VALUE"
    OPT_VALUE="$2"
    OPT_SHIFT=2
  fi
}

# Handles the options every pod script shares; returns 1 for an option it does not know.
parse_common_option() {
  case "$1" in
    --name|--name=*) opt_value "$@"; NAME="$OPT_VALUE" ;;
    --zone|--zone=*) opt_value "$@"; ZONE="$OPT_VALUE" ;;
    --project|--project=*) opt_value "$@"; PROJECT="$OPT_VALUE" ;;
    --dry-run) DRY_RUN=1; OPT_SHIFT=1 ;;
    *) return 1 ;;
  esac
}

COMMON_OPTIONS_HELP='Common options:
  --name=NAME        TPU VM (and queued resource) name     [default: $TPU_NAME]
  --zone=ZONE        e.g. us-central2-b, us-west4-a        [default: $TPU_ZONE]
  --project=PROJECT  GCP project                           [default: $GCP_PROJECT, else gcloud'"'"'s]
  --dry-run          print the exact commands instead of running them
  -h, --help         show this help'

check_common() {
  [[ -n "$NAME" ]] || die "no TPU name: pass --name=NAME (or export TPU_NAME)"
  [[ "$NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    die "bad --name '$NAME': use lowercase letters, digits and dashes, starting with a letter"
  [[ -n "$ZONE" ]] || die "no zone: pass --zone=ZONE, e.g. --zone=us-central2-b (or export TPU_ZONE)"
  [[ "$ZONE" =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] ||
    die "bad --zone '$ZONE': expected a zone like us-central2-b"
  if ((!DRY_RUN)) && ! command -v gcloud >/dev/null; then
    die "gcloud not found: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install) or use --dry-run"
  fi
}

check_worker() {
  [[ "$1" == all || "$1" =~ ^[0-9]+(,[0-9]+)*$ ]] ||
    die "bad --worker '$1': use all, a worker index (0) or a list (0,2)"
}
