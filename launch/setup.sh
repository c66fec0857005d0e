#!/usr/bin/env bash
# Puts the code on every worker of a TPU VM slice and builds its Python environment.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<EOF
Usage: $PROG --name=NAME --zone=ZONE [--repo=GIT_URL [--ref=REF] | --copy] [options]

Sets up every worker of the slice (--worker=all) in $REMOTE_DIR:
  1. the code: --copy (default) packs this checkout (tracked and untracked files that git does not
     ignore, uncommitted edits included) and copies it over with \`gcloud ... tpu-vm scp\`;
     --repo clones GIT_URL (or updates an earlier clone) and checks out --ref.
  2. the environment: a Python $PYTHON_VERSION venv made with uv in $REMOTE_DIR/venv, then
     \`pip install -r requirements.txt jax[tpu]==<the jax pinned in requirements.txt>\`.
Safe to re-run (after a code change, or on a recreated slice after preemption); --code-only skips
step 2 when only the code changed.

Options:
  --copy                 copy this checkout to the workers [default]
  --repo=GIT_URL         clone this repository on the workers instead
  --ref=REF              branch, tag or commit to check out with --repo [default: main]
  --python=VERSION       Python version of the venv [default: $PYTHON_VERSION]
  --code-only            update the code, keep the existing environment
  --worker=W             all, or worker indices like 0 or 0,3 [default: all]
$COMMON_OPTIONS_HELP

Example:
  $PROG --name=mo-v4 --zone=us-central2-b
EOF
}

PYTHON_VERSION=3.11
REPO=''
REF=main
COPY=0
CODE_ONLY=0
WORKER=all

while [[ $# -gt 0 ]]; do
  if parse_common_option "$@"; then shift "$OPT_SHIFT"; continue; fi
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --repo|--repo=*) opt_value "$@"; REPO="$OPT_VALUE"; shift "$OPT_SHIFT" ;;
    --ref|--ref=*) opt_value "$@"; REF="$OPT_VALUE"; shift "$OPT_SHIFT" ;;
    --python|--python=*) opt_value "$@"; PYTHON_VERSION="$OPT_VALUE"; shift "$OPT_SHIFT" ;;
    --worker|--worker=*) opt_value "$@"; WORKER="$OPT_VALUE"; shift "$OPT_SHIFT" ;;
    --copy) COPY=1; shift ;;
    --code-only) CODE_ONLY=1; shift ;;
    *) die "unknown option '$1' (see $PROG --help)" ;;
  esac
done

check_common
check_worker "$WORKER"
[[ -n "$REPO" && "$COPY" == 1 ]] && die "--repo and --copy exclude each other: pick one"
[[ "$PYTHON_VERSION" =~ ^3\.[0-9]+$ ]] || die "bad --python '$PYTHON_VERSION': use a version like 3.11"
[[ -z "$REPO" && "$REF" != main ]] && die "--ref needs --repo=GIT_URL"
[[ -f "$REPO_ROOT/requirements.txt" ]] || die "no requirements.txt in $REPO_ROOT: run this script from a mambaout_jax checkout"
JAX_VERSION="$(sed -n 's/^jax==\([0-9][0-9.]*\).*/\1/p' "$REPO_ROOT/requirements.txt" | head -n 1)"
[[ -n "$JAX_VERSION" ]] || die "requirements.txt pins no jax==VERSION: add one so jax[tpu] matches it"

if [[ -z "$REPO" ]]; then
  # Pack the checkout: what git tracks plus untracked files it does not ignore (so no venv, no
  # caches); a tree that is not a git checkout is packed whole, minus the usual clutter.
  ARCHIVE="${TMPDIR:-/tmp}/mambaout_jax_code_${NAME}.tar.gz"
  if git -C "$REPO_ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    PACK="cd $(shell_quote "$REPO_ROOT") && git ls-files -z --cached --others --exclude-standard | tar -czf $(shell_quote "$ARCHIVE") --null --ignore-failed-read -T -"
  else
    PACK="tar -czf $(shell_quote "$ARCHIVE") -C $(shell_quote "$REPO_ROOT") --exclude=.git --exclude=venv --exclude=__pycache__ ."
  fi
  if ((DRY_RUN)); then echo "$PACK"; else bash -c "set -o pipefail; $PACK"; fi
  gcloud_run compute tpus tpu-vm scp "$ARCHIVE" "$NAME:mambaout_jax_code.tar.gz" \
    "--zone=$ZONE" "--worker=$WORKER"
  FETCH_CODE="mkdir -p $REMOTE_DIR && tar -xzf mambaout_jax_code.tar.gz -C $REMOTE_DIR && rm mambaout_jax_code.tar.gz"
else
  # Clone once, then fetch and check out REF on later runs.
  FETCH_CODE="{ [ -d $REMOTE_DIR/.git ] || git clone --quiet $(shell_quote "$REPO") $REMOTE_DIR; }"
  FETCH_CODE+=" && git -C $REMOTE_DIR fetch --quiet origin && git -C $REMOTE_DIR checkout --quiet $(shell_quote "$REF")"
  FETCH_CODE+=" && { git -C $REMOTE_DIR merge --quiet --ff-only $(shell_quote "origin/$REF") 2>/dev/null || true; }"
fi

if ((CODE_ONLY)); then
  tpu_ssh "$WORKER" "$FETCH_CODE && echo \"\$(hostname): code updated in $REMOTE_DIR\""
else
  tpu_ssh "$WORKER" "$FETCH_CODE && cd $REMOTE_DIR && bash launch/worker.sh setup $(shell_quote "--python=$PYTHON_VERSION")"
fi
