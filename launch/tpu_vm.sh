#!/usr/bin/env bash
# Runs diffmix_jax on a Cloud TPU VM or pod slice: create, copy the repo, install, run on every
# worker, collect the logs, optionally delete. See launch/README.md; `--help` lists every parameter.
set -euo pipefail

PROG=$(basename "$0")
REPO=$(cd "$(dirname "$0")/.." && pwd)

NAME=${TPU_NAME:-}
ZONE=${TPU_ZONE:-${CLOUDSDK_COMPUTE_ZONE:-}}
PROJECT=${CLOUDSDK_CORE_PROJECT:-}
ACCELERATOR=${TPU_ACCELERATOR_TYPE:-v4-8}
RUNTIME=${TPU_RUNTIME_VERSION:-tpu-ubuntu2204-base}
CONFIG=${DIFFMIX_CONFIG:-}
WORKDIR=${DIFFMIX_WORKDIR:-}
REMOTE_DIR=diffmix_jax
PYTHON_BIN=python3.11
VENV=.venv
RUN_ID=$(date -u +%Y%m%d-%H%M%S)
LOG_DIR=''
SETUP=''
SPOT=0
INTERNAL_IP=0
SKIP_CREATE=0
SKIP_INSTALL=0
DELETE=0
DRY_RUN=0
CREATE_FLAGS=()
ENVS=()
EXTRA=()

usage() {
  cat <<EOF
Usage: launch/$PROG --name NAME --zone ZONE --config FILE --workdir DIR [options] [-- MAIN_ARGS...]

Steps (each printed before it runs):
  1. create the TPU VM / pod slice (skipped when NAME exists and is READY, or with --skip-create)
  2. optional --setup command on every worker (e.g. mount a bucket)
  3. pack this repository (tar, without .git and runs/) and copy it to every worker (scp --worker=all)
  4. install: a virtualenv with '.[tpu]' on every worker (skip with --skip-install)
  5. run 'python -m diffmix_jax.main ... --config.mesh.distributed=True' on every worker at once;
     JAX finds the coordinator and process ids of the slice itself
  6. collect every worker's log into the local --log-dir (<worker>.log)
  7. with --delete: delete the TPU VM (also when the run failed)
The --workdir must be a path every worker sees (a GCS bucket mounted with gcsfuse, or NFS):
checkpoints are written collectively by all processes. Rerun the same command to resume.

Required:
  --name NAME              TPU VM name (env TPU_NAME).
  --zone ZONE              Zone, e.g. us-central2-b (env TPU_ZONE or CLOUDSDK_COMPUTE_ZONE).
  --config FILE            Config path relative to the repository root, e.g. configs/consep.py
                           (env DIFFMIX_CONFIG).
  --workdir DIR            Workdir as the workers see it, on a shared filesystem (env DIFFMIX_WORKDIR).

Create:
  --project PROJECT        Google Cloud project (env CLOUDSDK_CORE_PROJECT; default: gcloud's
                           configured project).
  --accelerator-type TYPE  Slice type, e.g. v4-8 (1 host), v4-32 (4 hosts) (env TPU_ACCELERATOR_TYPE;
                           default: $ACCELERATOR).
  --runtime-version VER    TPU software version (env TPU_RUNTIME_VERSION; default: $RUNTIME;
                           v5e: v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e).
  --spot                   Create a Spot TPU (cheaper, can be preempted).
  --create-flag FLAG       Extra flag for 'gcloud compute tpus tpu-vm create', e.g.
                           --create-flag=--reserved; repeatable.
  --skip-create            Use the existing TPU VM NAME without checking or creating it.

Copy, install, run:
  --internal-ip            ssh/scp over internal IPs (when running from a VM in the same network).
  --setup CMD              Shell command run on every worker before the install (default: none).
  --skip-install           Do not create the virtualenv / pip install (already done).
  --python BIN             Interpreter on the workers for the virtualenv; jax needs Python >= 3.11,
                           installed with apt when missing (default: $PYTHON_BIN).
  --venv DIR               Virtualenv, relative to --remote-dir (default: $VENV).
  --remote-dir DIR         Repository copy on every worker, relative to the home folder
                           (default: $REMOTE_DIR).
  --env KEY=VALUE          Extra environment variable for main on every worker; repeatable.
  --run-id ID              Names the logs of this run (default: UTC time, now $RUN_ID).
  --log-dir DIR            Local folder for the collected logs (default: runs/launch/NAME-RUN_ID
                           under the repository root).
  --delete                 Delete the TPU VM at the end.
  --dry-run                Print every command instead of running it.
  -h, --help               Show this help and exit.

Everything after '--' is passed to diffmix_jax.main unchanged, e.g.
  -- --config.diffusion.train.batch_size=64. Options also accept the --name=value form.

Example (v4-32 slice, workdir on a bucket mounted at /mnt/diffmix on every worker):
  launch/$PROG --name diffmix-v4-32 --zone us-central2-b --accelerator-type v4-32 \\
      --config configs/consep.py --workdir /mnt/diffmix/consep \\
      -- --config.data.manual_dir=/mnt/diffmix/data/CoNSeP
EOF
}

die() { echo "$PROG: error: $*" >&2; exit 2; }
arg() { (($# >= 2)) || die "$1 needs a value (see --help)"; }

# q WORD: WORD quoted for a POSIX shell (left bare when that is safe).
q() {
  if [[ -n $1 && $1 =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
qargs() { local out='' a; for a in "$@"; do out+="${out:+ }$(q "$a")"; done; printf '%s' "$out"; }

# run CMD...: prints CMD (to stdout in a dry run, with '+ ' to stderr otherwise) and runs it unless dry.
run() {
  if ((DRY_RUN)); then qargs "$@"; echo; return 0; fi
  echo "+ $(qargs "$@")" >&2
  "$@"
}
note() { if ((DRY_RUN)); then echo "# $*"; else echo "[$PROG] $*" >&2; fi; }

while (($#)); do
  case $1 in
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
    --name) arg "$@"; NAME=$2; shift 2 ;;
    --zone) arg "$@"; ZONE=$2; shift 2 ;;
    --project) arg "$@"; PROJECT=$2; shift 2 ;;
    --accelerator-type) arg "$@"; ACCELERATOR=$2; shift 2 ;;
    --runtime-version) arg "$@"; RUNTIME=$2; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --create-flag) arg "$@"; CREATE_FLAGS+=("$2"); shift 2 ;;
    --skip-create) SKIP_CREATE=1; shift ;;
    --internal-ip) INTERNAL_IP=1; shift ;;
    --setup) arg "$@"; SETUP=$2; shift 2 ;;
    --skip-install) SKIP_INSTALL=1; shift ;;
    --python) arg "$@"; PYTHON_BIN=$2; shift 2 ;;
    --venv) arg "$@"; VENV=$2; shift 2 ;;
    --remote-dir) arg "$@"; REMOTE_DIR=$2; shift 2 ;;
    --config) arg "$@"; CONFIG=$2; shift 2 ;;
    --workdir) arg "$@"; WORKDIR=$2; shift 2 ;;
    --env) arg "$@"; [[ $2 == [A-Za-z_]*=* ]] || die "--env wants KEY=VALUE, got '$2'"
      ENVS+=("$2"); shift 2 ;;
    --run-id) arg "$@"; RUN_ID=$2; shift 2 ;;
    --log-dir) arg "$@"; LOG_DIR=$2; shift 2 ;;
    --delete) DELETE=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument '$1' (see --help; arguments for main go after --)" ;;
  esac
done

[[ -n $NAME ]] || die "--name is required (or set TPU_NAME); see --help"
[[ -n $ZONE ]] || die "--zone is required (or set TPU_ZONE); see --help"
[[ -n $CONFIG ]] || die "--config is required (or set DIFFMIX_CONFIG); see --help"
[[ -n $WORKDIR ]] || die "--workdir is required (or set DIFFMIX_WORKDIR); see --help"
[[ $RUN_ID =~ ^[A-Za-z0-9_.-]+$ ]] || die "--run-id may hold only letters, digits, '_', '.', '-'"
[[ -n $REMOTE_DIR && -n $VENV ]] || die "--remote-dir and --venv must not be empty"
if ((!DRY_RUN)); then
  command -v gcloud >/dev/null || die "gcloud not found: install the Google Cloud CLI (launch/README.md)"
fi
[[ -n $LOG_DIR ]] || LOG_DIR=runs/launch/$NAME-$RUN_ID

tpu=(gcloud compute tpus tpu-vm)
where=("--zone=$ZONE")
[[ -n $PROJECT ]] && where+=("--project=$PROJECT")
conn=(--worker=all --strict-host-key-checking=no)
((INTERNAL_IP)) && conn+=(--internal-ip)
on_workers() { run "${tpu[@]}" ssh "$NAME" "${where[@]}" "${conn[@]}" --command="$1" "${@:2}"; }

rdir=$(q "$REMOTE_DIR")
archive_name=diffmix_jax_src-$RUN_ID.tgz
archive=${TMPDIR:-/tmp}/$archive_name
remote_log=logs/$RUN_ID.log

run cd "$REPO"

# 1. Create.
if ((!SKIP_CREATE)); then
  create=("${tpu[@]}" create "$NAME" "${where[@]}" "--accelerator-type=$ACCELERATOR"
          "--version=$RUNTIME")
  ((SPOT)) && create+=(--spot)
  create+=(${CREATE_FLAGS[@]+"${CREATE_FLAGS[@]}"})
  if ((DRY_RUN)); then
    note "skipped when '$(qargs "${tpu[@]}" describe "$NAME" "${where[@]}")' finds $NAME:"
    run "${create[@]}"
  elif state=$("${tpu[@]}" describe "$NAME" "${where[@]}" --format='value(state)' 2>/dev/null); then
    case $state in
      READY) note "TPU VM $NAME exists in $ZONE: using it" ;;
      *) die "TPU VM $NAME is in state '$state' (a preempted Spot VM stays PREEMPTED): delete it with
  $(qargs "${tpu[@]}" delete "$NAME" "${where[@]}")
and rerun this command" ;;
    esac
  else
    run "${create[@]}"
  fi
fi

# 2. Optional per-worker setup.
[[ -n $SETUP ]] && on_workers "$SETUP"

# 3. Copy the repository.
run tar -czf "$archive" --exclude=./.git --exclude=./runs --exclude=./.venv --exclude=__pycache__ \
  --exclude='*.egg-info' --exclude=.pytest_cache --exclude=./.benchmarks -C "$REPO" .
run "${tpu[@]}" scp "$archive" "$NAME:$archive_name" "${where[@]}" "${conn[@]}"
run rm -f "$archive"
on_workers "mkdir -p $rdir && tar -xzf $archive_name -C $rdir && rm -f $archive_name"

# 4. Install.
if ((!SKIP_INSTALL)); then
  py=$(q "$PYTHON_BIN")
  venv=$(q "$VENV")
  apt=''
  if [[ $PYTHON_BIN =~ ^python3\.[0-9]+$ ]]; then  # Ubuntu's package names equal the command.
    apt=" || { sudo apt-get -o DPkg::Lock::Timeout=600 update -qq && sudo DEBIAN_FRONTEND=noninteractive"
    apt+=" apt-get -o DPkg::Lock::Timeout=600 install -y -qq $py $py-venv; }"
  fi
  on_workers "cd $rdir && { $py -c \"import ensurepip\" 2>/dev/null$apt; } && { [ -x $venv/bin/python ] || $py -m venv $venv; } && $venv/bin/python -m pip install -q -U pip && $venv/bin/python -m pip install -q -e \".[tpu]\""
fi

# 5. Run on every worker; each worker tees its output to <remote-dir>/logs/<run-id>.log.
main_cmd=("$VENV/bin/python" -m diffmix_jax.main --config "$CONFIG" --workdir "$WORKDIR"
          --config.mesh.distributed=True ${EXTRA[@]+"${EXTRA[@]}"})
if ((${#ENVS[@]})); then main_cmd=(env "${ENVS[@]}" "${main_cmd[@]}"); fi
rc=0
on_workers "set -o pipefail; cd $rdir && mkdir -p logs && $(qargs "${main_cmd[@]}") 2>&1 | tee $remote_log; rc=\$?; echo \"[launch] exit status \$rc\" >> $remote_log; exit \$rc" || rc=$?

# 6. Collect logs: gcloud writes one <worker>.log per worker into the folder.
run mkdir -p "$LOG_DIR"
on_workers "cat $rdir/$remote_log" "--output-directory=$LOG_DIR" \
  || note "warning: could not collect every log (see $LOG_DIR)"

# 7. Delete.
if ((DELETE)); then
  run "${tpu[@]}" delete "$NAME" "${where[@]}" --quiet || note "warning: deleting $NAME failed"
fi

if ((!DRY_RUN)); then
  failed=0
  for f in "$LOG_DIR"/*.log; do
    [[ -e $f ]] || continue
    status=$(sed -n 's/^\[launch\] exit status \([0-9]*\)$/\1/p' "$f" | tail -n 1)
    if [[ $status != 0 ]]; then
      failed=1
      note "worker $(basename "$f" .log): exit status ${status:-unknown (killed or disconnected)}"
    fi
  done
  ((failed)) && ((rc == 0)) && rc=1
  if ((rc)); then
    note "run failed (status $rc); logs in $LOG_DIR. Rerun the same command to resume."
  else
    note "done; logs in $LOG_DIR"
  fi
fi
exit "$rc"
