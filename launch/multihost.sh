#!/usr/bin/env bash
# Runs diffmix_jax on N hosts over ssh, one process per host (each drives all of its GPUs);
# process 0 is the coordinator. See launch/README.md; `--help` lists every parameter.
set -euo pipefail

PROG=$(basename "$0")
REPO=$(cd "$(dirname "$0")/.." && pwd)

HOSTS=${DIFFMIX_HOSTS:-}
PORT=${DIFFMIX_COORDINATOR_PORT:-8476}
COORDINATOR=''
CONFIG=${DIFFMIX_CONFIG:-}
WORKDIR=${DIFFMIX_WORKDIR:-}
REMOTE_DIR=$REPO
PYTHON_BIN=${PYTHON:-python3}
SSH=${DIFFMIX_SSH:-ssh -o BatchMode=yes}
INSTALL_EXTRA=cuda
MEM_FRACTION=0.9
NCCL_DEBUG_LEVEL=WARN
RUN_ID=$(date -u +%Y%m%d-%H%M%S)
LOG_DIR=''
SYNC=0
INSTALL=0
TTY=0
DRY_RUN=0
ENVS=()
EXTRA=()

usage() {
  cat <<EOF
Usage: launch/$PROG --hosts H0,H1,... --config FILE --workdir DIR [options] [-- MAIN_ARGS...]

Starts 'python -m diffmix_jax.main ... --config.mesh.distributed=True' over ssh on every host at once,
process i on host i (i = 0..N-1), all pointed at the coordinator on host 0. Each host's output goes to
<log-dir>/host<i>.log. Waits for all hosts; exits non-zero if any failed. When a host dies, the others
stop after --config.mesh.heartbeat_timeout seconds; rerun the same command to resume from the last
checkpoint. The --workdir must be a path every host sees (NFS, or a bucket mounted with gcsfuse):
checkpoints are written collectively by all processes.

Required:
  --hosts LIST               Comma-separated ssh destinations ([user@]host), host 0 first
                             (env DIFFMIX_HOSTS).
  --config FILE              Config path relative to the repository root (env DIFFMIX_CONFIG).
  --workdir DIR              Workdir on a filesystem all hosts share (env DIFFMIX_WORKDIR).

Options:
  --port PORT                Coordinator port on host 0; must be reachable from every host
                             (env DIFFMIX_COORDINATOR_PORT; default: $PORT).
  --coordinator-address A    host:port the processes use to reach process 0 (default: host 0's
                             name from --hosts, without user@, and --port).
  --remote-dir DIR           Repository on every host (default: this checkout's path, $REMOTE_DIR).
  --python BIN               Python on the hosts (env PYTHON; default: $PYTHON_BIN).
  --ssh CMD                  ssh command and options, e.g. "ssh -i ~/.ssh/key -p 2222"
                             (env DIFFMIX_SSH; default: $SSH).
  --tty                      Give each ssh a terminal (ssh -tt): interrupting this script then also
                             stops the remote processes.
  --sync                     First copy this checkout to --remote-dir on every host with rsync
                             (not needed when the hosts share the checkout over NFS).
  --install                  First run 'pip install -e ".[EXTRA]"' on every host, one after another.
  --extra NAME               The extra --install uses (default: $INSTALL_EXTRA; '' for none).
  --mem-fraction F           XLA_PYTHON_CLIENT_MEM_FRACTION on every host (default: $MEM_FRACTION).
  --nccl-debug LEVEL         NCCL_DEBUG on every host (default: $NCCL_DEBUG_LEVEL).
  --env KEY=VALUE            Extra environment variable for main on every host; repeatable.
  --run-id ID                Names this run's log folder (default: UTC time, now $RUN_ID).
  --log-dir DIR              Local folder for the per-host logs (default: runs/launch/multihost-RUN_ID
                             under the repository root).
  --dry-run                  Print every command instead of running it.
  -h, --help                 Show this help and exit.

Everything after '--' is passed to diffmix_jax.main unchanged, e.g.
  -- --config.mesh.heartbeat_timeout=60. Options also accept the --name=value form.

Example (2 hosts x 8 GPUs, checkout and workdir on NFS):
  launch/$PROG --hosts gpu-a,gpu-b --config configs/consep.py --workdir /nfs/diffmix/consep
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
    --hosts) arg "$@"; HOSTS=$2; shift 2 ;;
    --port) arg "$@"; PORT=$2; shift 2 ;;
    --coordinator-address) arg "$@"; COORDINATOR=$2; shift 2 ;;
    --config) arg "$@"; CONFIG=$2; shift 2 ;;
    --workdir) arg "$@"; WORKDIR=$2; shift 2 ;;
    --remote-dir) arg "$@"; REMOTE_DIR=$2; shift 2 ;;
    --python) arg "$@"; PYTHON_BIN=$2; shift 2 ;;
    --ssh) arg "$@"; SSH=$2; shift 2 ;;
    --tty) TTY=1; shift ;;
    --sync) SYNC=1; shift ;;
    --install) INSTALL=1; shift ;;
    --extra) arg "$@"; INSTALL_EXTRA=$2; shift 2 ;;
    --mem-fraction) arg "$@"; MEM_FRACTION=$2; shift 2 ;;
    --nccl-debug) arg "$@"; NCCL_DEBUG_LEVEL=$2; shift 2 ;;
    --env) arg "$@"; [[ $2 == [A-Za-z_]*=* ]] || die "--env wants KEY=VALUE, got '$2'"
      ENVS+=("$2"); shift 2 ;;
    --run-id) arg "$@"; RUN_ID=$2; shift 2 ;;
    --log-dir) arg "$@"; LOG_DIR=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument '$1' (see --help; arguments for main go after --)" ;;
  esac
done

read -r -a hosts <<<"${HOSTS//,/ }" || true
((${#hosts[@]})) || die "--hosts is required (or set DIFFMIX_HOSTS); see --help"
[[ -n $CONFIG ]] || die "--config is required (or set DIFFMIX_CONFIG); see --help"
[[ -n $WORKDIR ]] || die "--workdir is required (or set DIFFMIX_WORKDIR); see --help"
[[ $PORT =~ ^[0-9]+$ ]] || die "--port must be a number, got '$PORT'"
[[ $INSTALL_EXTRA =~ ^[A-Za-z0-9_,-]*$ ]] || die "--extra must be an extra's name, got '$INSTALL_EXTRA'"
[[ $RUN_ID =~ ^[A-Za-z0-9_.-]+$ ]] || die "--run-id may hold only letters, digits, '_', '.', '-'"
read -r -a ssh_cmd <<<"$SSH" || true
((${#ssh_cmd[@]})) || die "--ssh must not be empty"
((TTY)) && ssh_cmd+=(-tt)
[[ -n $COORDINATOR ]] || COORDINATOR=${hosts[0]##*@}:$PORT
[[ -n $LOG_DIR ]] || LOG_DIR=runs/launch/multihost-$RUN_ID
n=${#hosts[@]}
rdir=$(q "$REMOTE_DIR")

run cd "$REPO"

if ((SYNC)); then
  for h in "${hosts[@]}"; do
    run "${ssh_cmd[@]}" "$h" "mkdir -p $rdir"
    run rsync -az -e "$SSH" --exclude=/.git --exclude=/runs --exclude=.venv --exclude=__pycache__ \
      --exclude='*.egg-info' --exclude=.pytest_cache "$REPO/" "$h:$REMOTE_DIR/"
  done
fi
if ((INSTALL)); then
  target=.${INSTALL_EXTRA:+[$INSTALL_EXTRA]}
  for h in "${hosts[@]}"; do
    run "${ssh_cmd[@]}" "$h" "cd $rdir && $(q "$PYTHON_BIN") -m pip install -e \"$target\""
  done
fi

env_args=(XLA_PYTHON_CLIENT_MEM_FRACTION="$MEM_FRACTION" NCCL_DEBUG="$NCCL_DEBUG_LEVEL"
          ${ENVS[@]+"${ENVS[@]}"})
run mkdir -p "$LOG_DIR"
pids=()
stop() {
  note "interrupted: stopping the local ssh processes"
  for p in ${pids[@]+"${pids[@]}"}; do kill "$p" 2>/dev/null || true; done
  ((TTY)) || note "without --tty the remote processes may keep running; stop them on each host"
  exit 130
}
trap stop INT TERM
for ((i = 0; i < n; i++)); do
  remote="cd $rdir && $(qargs env "${env_args[@]}" "$PYTHON_BIN" -m diffmix_jax.main \
    --config "$CONFIG" --workdir "$WORKDIR" --config.mesh.distributed=True \
    "--config.mesh.coordinator_address=$COORDINATOR" "--config.mesh.num_processes=$n" \
    "--config.mesh.process_id=$i" ${EXTRA[@]+"${EXTRA[@]}"})"
  log=$LOG_DIR/host$i.log
  if ((DRY_RUN)); then
    echo "$(qargs "${ssh_cmd[@]}" "${hosts[i]}" "$remote") < /dev/null > $(q "$log") 2>&1 &"
  else
    echo "+ $(qargs "${ssh_cmd[@]}" "${hosts[i]}" "$remote") > $(q "$log") 2>&1 &" >&2
    "${ssh_cmd[@]}" "${hosts[i]}" "$remote" </dev/null >"$log" 2>&1 &
    pids+=($!)
  fi
done
if ((DRY_RUN)); then
  echo "wait"
  exit 0
fi

note "$n processes started; coordinator $COORDINATOR; follow process 0 with: tail -f $LOG_DIR/host0.log"
failed=0
for ((i = 0; i < n; i++)); do
  status=0
  wait "${pids[i]}" || status=$?
  if ((status)); then
    failed=$((failed + 1))
    note "host$i ${hosts[i]}: FAILED (exit status $status); last lines of $LOG_DIR/host$i.log:"
    tail -n 20 "$LOG_DIR/host$i.log" >&2 || true
  else
    note "host$i ${hosts[i]}: ok"
  fi
done
trap - INT TERM
if ((failed)); then
  note "$failed of $n hosts failed; logs in $LOG_DIR. Rerun the same command to resume."
  exit 1
fi
note "all $n hosts finished; logs in $LOG_DIR"
