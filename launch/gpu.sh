#!/usr/bin/env bash
# Runs diffmix_jax on one host with all of its GPUs: one process, JAX drives every local GPU.
# See launch/README.md. `launch/gpu.sh --help` lists every parameter.
set -euo pipefail

PROG=$(basename "$0")
REPO=$(cd "$(dirname "$0")/.." && pwd)

CONFIG=${DIFFMIX_CONFIG:-}
WORKDIR=${DIFFMIX_WORKDIR:-}
PYTHON_BIN=${PYTHON:-python3}
MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
GPUS=${CUDA_VISIBLE_DEVICES:-}
NCCL_DEBUG_LEVEL=${NCCL_DEBUG:-WARN}
COMPILE_CACHE=${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/diffmix_jax/jax_cache}
XLA_FLAGS_EXTRA=''
LOG=''
INSTALL=0
DRY_RUN=0
ENVS=()
EXTRA=()

usage() {
  cat <<EOF
Usage: launch/$PROG --config FILE --workdir DIR [options] [-- MAIN_ARGS...]

Runs 'python -m diffmix_jax.main' once on this host; JAX uses every visible GPU
from that one process. Commands run in the repository root ($REPO), so relative
paths are taken from there. Rerun the same command to resume from the workdir.

Required:
  --config FILE        Experiment config, e.g. configs/consep.py (env DIFFMIX_CONFIG).
  --workdir DIR        Output and checkpoint folder (env DIFFMIX_WORKDIR).

Options:
  --install            First run: $PYTHON_BIN -m pip install -e ".[cuda]" (default: install nothing).
  --python BIN         Python interpreter (env PYTHON; default: $PYTHON_BIN).
  --gpus LIST          CUDA_VISIBLE_DEVICES, e.g. 0,1,2,3 (default: all GPUs${GPUS:+; now $GPUS}).
  --mem-fraction F     XLA_PYTHON_CLIENT_MEM_FRACTION: share of each GPU's memory JAX
                       preallocates (default: $MEM_FRACTION).
  --nccl-debug LEVEL   NCCL_DEBUG (default: $NCCL_DEBUG_LEVEL).
  --compile-cache DIR  JAX_COMPILATION_CACHE_DIR, the persistent compilation cache that
                       makes restarts compile faster; '' leaves it unset
                       (default: $COMPILE_CACHE).
  --xla-flags FLAGS    Appended to XLA_FLAGS (default: none).
  --env KEY=VALUE      Extra environment variable for main; repeatable.
  --log FILE           Also append all output to FILE (default: terminal only).
  --dry-run            Print every command instead of running it.
  -h, --help           Show this help and exit.

Everything after '--' is passed to diffmix_jax.main unchanged, e.g.
  -- --config.stages=diffusion_train --config.diffusion.train.batch_size=32
Options also accept the --name=value form.

Example:
  launch/$PROG --config configs/consep.py --workdir runs/consep \\
      -- --config.data.manual_dir=/data/CoNSeP
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

while (($#)); do
  case $1 in
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
    --config) arg "$@"; CONFIG=$2; shift 2 ;;
    --workdir) arg "$@"; WORKDIR=$2; shift 2 ;;
    --install) INSTALL=1; shift ;;
    --python) arg "$@"; PYTHON_BIN=$2; shift 2 ;;
    --gpus) arg "$@"; GPUS=$2; shift 2 ;;
    --mem-fraction) arg "$@"; MEM_FRACTION=$2; shift 2 ;;
    --nccl-debug) arg "$@"; NCCL_DEBUG_LEVEL=$2; shift 2 ;;
    --compile-cache) arg "$@"; COMPILE_CACHE=$2; shift 2 ;;
    --xla-flags) arg "$@"; XLA_FLAGS_EXTRA=$2; shift 2 ;;
    --env) arg "$@"; [[ $2 == [A-Za-z_]*=* ]] || die "--env wants KEY=VALUE, got '$2'"
      ENVS+=("$2"); shift 2 ;;
    --log) arg "$@"; LOG=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument '$1' (see --help; arguments for main go after --)" ;;
  esac
done

[[ -n $CONFIG ]] || die "--config is required (or set DIFFMIX_CONFIG); see --help"
[[ -n $WORKDIR ]] || die "--workdir is required (or set DIFFMIX_WORKDIR); see --help"
[[ $MEM_FRACTION =~ ^(0(\.[0-9]+)?|1(\.0*)?)$ ]] || die "--mem-fraction must be in [0, 1], got '$MEM_FRACTION'"

env_args=(XLA_PYTHON_CLIENT_MEM_FRACTION="$MEM_FRACTION" NCCL_DEBUG="$NCCL_DEBUG_LEVEL")
[[ -n $GPUS ]] && env_args+=(CUDA_VISIBLE_DEVICES="$GPUS")
[[ -n $COMPILE_CACHE ]] && env_args+=(JAX_COMPILATION_CACHE_DIR="$COMPILE_CACHE")
[[ -n $XLA_FLAGS_EXTRA ]] && env_args+=(XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }$XLA_FLAGS_EXTRA")
env_args+=(${ENVS[@]+"${ENVS[@]}"})
main_cmd=(env "${env_args[@]}" "$PYTHON_BIN" -m diffmix_jax.main --config "$CONFIG" --workdir "$WORKDIR"
          ${EXTRA[@]+"${EXTRA[@]}"})

run cd "$REPO"
if ((INSTALL)); then
  run "$PYTHON_BIN" -m pip install -e ".[cuda]"
fi
if [[ -z $LOG ]]; then
  run "${main_cmd[@]}"
elif ((DRY_RUN)); then
  echo "$(qargs "${main_cmd[@]}") 2>&1 | tee -a $(q "$LOG")"
else
  mkdir -p "$(dirname "$LOG")"
  echo "+ $(qargs "${main_cmd[@]}") 2>&1 | tee -a $(q "$LOG")" >&2
  "${main_cmd[@]}" 2>&1 | tee -a "$LOG"
fi
