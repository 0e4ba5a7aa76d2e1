"""Tests of the launch scripts (launch/*.sh): syntax, --help, required flags, dry runs, exit codes.

No network and no cloud: dry runs must not start any program (fake gcloud/ssh/pip/python on PATH record
every call), and the real code paths run against fake gcloud/ssh executables. One test starts two real
`diffmix_jax.main` processes through multihost.sh over a fake ssh and 127.0.0.1.
"""

import os
import pathlib
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys

import pytest

from conftest import HANG_TIMEOUT

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / 'launch'
SCRIPTS = ['gpu.sh', 'tpu_vm.sh', 'multihost.sh']
# Programs a dry run must never start.
WATCHED = ['gcloud', 'ssh', 'scp', 'rsync', 'pip', 'pip3', 'python', 'python3', 'python3.11', 'tar',
           'nvidia-smi']
# Environment variables the scripts read as defaults; cleared so the tests see the built-in defaults.
_SCRIPT_ENV_PREFIXES = ('DIFFMIX_', 'TPU_', 'CLOUDSDK_')
_SCRIPT_ENV_NAMES = ('PYTHON', 'XLA_PYTHON_CLIENT_MEM_FRACTION', 'CUDA_VISIBLE_DEVICES', 'NCCL_DEBUG',
                     'JAX_COMPILATION_CACHE_DIR')

# Valid arguments of each script (dry runs); the required ones are the flags listed in REQUIRED.
BASE_ARGS = {
    'gpu.sh': ['--config', 'configs/consep.py', '--workdir', 'runs/consep'],
    'tpu_vm.sh': ['--name', 'diffmix-v4-32', '--zone', 'us-central2-b', '--accelerator-type', 'v4-32',
                  '--config', 'configs/consep.py', '--workdir', '/mnt/diffmix/consep'],
    'multihost.sh': ['--hosts', 'me@gpu-a,gpu-b', '--config', 'configs/consep.py', '--workdir',
                     '/nfs/diffmix/consep'],
}
REQUIRED = {
    'gpu.sh': ['--config', '--workdir'],
    'tpu_vm.sh': ['--name', '--zone', '--config', '--workdir'],
    'multihost.sh': ['--hosts', '--config', '--workdir'],
}
PASSTHROUGH = ['--config.diffusion.train.batch_size=64', '--config.mesh.heartbeat_timeout=60']


def _write_exe(path: pathlib.Path, text: str) -> pathlib.Path:
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
  return path


@pytest.fixture
def trap(tmp_path):
  """A folder of fake WATCHED programs (put first on PATH) that record any call to `calls.txt`."""
  bin_dir = tmp_path / 'trap_bin'
  bin_dir.mkdir()
  record = tmp_path / 'calls.txt'
  for name in WATCHED:
    _write_exe(bin_dir / name, f'#!/usr/bin/env bash\necho "{name} $*" >> {shlex.quote(str(record))}\n'
               'exit 1\n')
  return bin_dir, record


def _env(path_first: pathlib.Path | None = None, **extra) -> dict:
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(_SCRIPT_ENV_PREFIXES) and k not in _SCRIPT_ENV_NAMES}
  if path_first is not None:
    env['PATH'] = f'{path_first}{os.pathsep}{env.get("PATH", "")}'
  env.update(extra)
  return env


def _run(script: str, args, env=None, timeout=HANG_TIMEOUT) -> subprocess.CompletedProcess:
  return subprocess.run(['bash', str(LAUNCH / script), *args], capture_output=True, text=True,
                        env=env if env is not None else _env(), timeout=timeout, cwd=ROOT)


def _dry(script: str, args, trap, **extra_env) -> list[list[str]]:
  """Runs a dry run under the trap; returns its printed commands, each split into words."""
  bin_dir, record = trap
  res = _run(script, ['--dry-run', *args], env=_env(bin_dir, **extra_env))
  assert res.returncode == 0, res.stderr
  assert not record.exists(), f'a dry run started programs:\n{record.read_text()}'
  lines = [l for l in res.stdout.splitlines() if l.strip() and not l.startswith('#')]
  return [shlex.split(l) for l in lines]


def _parsed_flags(script: str) -> set[str]:
  """The options the script's argument parser accepts: the patterns of its `case` arms."""
  text = (LAUNCH / script).read_text()
  flags = set()
  for m in re.finditer(r'(?m)^\s*(-{1,2}[A-Za-z][\w-]*(?:\|-{1,2}[A-Za-z][\w-]*)*)\)', text):
    flags.update(m.group(1).split('|'))
  return flags


def _find(cmds, *words, start=0):
  """Index of the first command (from `start`) whose words include all of `words`."""
  for i in range(start, len(cmds)):
    if all(w in cmds[i] for w in words):
      return i
  raise AssertionError(f'no command with {words} in:\n' + '\n'.join(shlex.join(c) for c in cmds))


# ---- every script ----

@pytest.mark.parametrize('script', SCRIPTS)
def test_syntax_strict_mode_and_executable(script):
  path = LAUNCH / script
  res = subprocess.run(['bash', '-n', str(path)], capture_output=True, text=True)
  assert res.returncode == 0, res.stderr
  text = path.read_text()
  assert text.startswith('#!/usr/bin/env bash\n')
  assert re.search(r'(?m)^set -euo pipefail$', text)
  assert os.access(path, os.X_OK), f'{script} is not executable'


@pytest.mark.skipif(shutil.which('shellcheck') is None, reason='shellcheck is not installed')
def test_shellcheck_is_clean():
  res = subprocess.run(['shellcheck', '-s', 'bash', *(str(LAUNCH / s) for s in SCRIPTS)],
                       capture_output=True, text=True)
  assert res.returncode == 0, res.stdout


@pytest.mark.parametrize('script', SCRIPTS)
def test_help_mentions_every_parsed_flag(script):
  flags = _parsed_flags(script)
  assert {'--dry-run', '--help', '-h'} <= flags, flags
  assert len(flags) >= 8, flags  # The parser was found, not just a stray pattern.
  res = _run(script, ['--help'])
  assert res.returncode == 0, res.stderr
  missing = [f for f in sorted(flags)
             if not re.search(r'(?<![\w-])' + re.escape(f) + r'(?![\w-])', res.stdout)]
  assert not missing, f'{script} --help does not mention {missing}'
  assert 'default' in res.stdout and "after '--'" in res.stdout


@pytest.mark.parametrize('script,flag', [(s, f) for s in SCRIPTS for f in REQUIRED[s]])
def test_missing_required_parameter_is_an_error_naming_it(script, flag, trap):
  args = list(BASE_ARGS[script])
  i = args.index(flag)
  del args[i:i + 2]
  res = _run(script, ['--dry-run', *args], env=_env(trap[0]))
  assert res.returncode != 0
  assert flag in res.stderr and 'required' in res.stderr, res.stderr
  assert not res.stdout
  assert not trap[1].exists()


@pytest.mark.parametrize('script', SCRIPTS)
def test_bad_arguments_are_errors(script):
  res = _run(script, ['--dry-run', *BASE_ARGS[script], '--no-such-flag'])
  assert res.returncode != 0 and '--no-such-flag' in res.stderr
  res = _run(script, ['--dry-run', *BASE_ARGS[script], '--env'])  # Flag without its value.
  assert res.returncode != 0 and '--env needs a value' in res.stderr


@pytest.mark.parametrize('script', SCRIPTS)
def test_equals_form_and_env_defaults(script, trap):
  """--flag=value equals --flag value; the required values can also come from the environment."""
  args = BASE_ARGS[script]
  pairs = [(args[i], args[i + 1]) for i in range(0, len(args), 2)]
  run_id = [] if script == 'gpu.sh' else ['--run-id', 'r1']  # Fixed log names (else the time).
  spaced = _dry(script, [*args, *run_id], trap)
  assert _dry(script, [f'{k}={v}' for k, v in pairs] + run_id, trap) == spaced
  env_names = {'--config': 'DIFFMIX_CONFIG', '--workdir': 'DIFFMIX_WORKDIR', '--hosts': 'DIFFMIX_HOSTS',
               '--name': 'TPU_NAME', '--zone': 'TPU_ZONE'}
  from_env = {env_names[k]: v for k, v in pairs if k in env_names}
  rest = [w for k, v in pairs if k not in env_names for w in (k, v)]
  assert _dry(script, rest + run_id, trap, **from_env) == spaced


# ---- gpu.sh ----

def test_gpu_dry_run_prints_the_main_command(trap):
  cmds = _dry('gpu.sh', [*BASE_ARGS['gpu.sh'], '--', *PASSTHROUGH], trap)
  assert cmds[0] == ['cd', str(ROOT)]
  assert not any('pip' in c for c in cmds)  # Installs nothing by default.
  main = cmds[_find(cmds, 'diffmix_jax.main')]
  assert main[0] == 'env' and 'XLA_PYTHON_CLIENT_MEM_FRACTION=0.9' in main
  k = main.index('-m')
  assert main[k - 1:] == ['python3', '-m', 'diffmix_jax.main', '--config', 'configs/consep.py',
                          '--workdir', 'runs/consep', *PASSTHROUGH]
  assert '--config.mesh.distributed=True' not in main  # One process drives all local GPUs.


def test_gpu_dry_run_install_and_options(trap):
  cmds = _dry('gpu.sh', [*BASE_ARGS['gpu.sh'], '--install', '--gpus', '0,1', '--mem-fraction', '0.75', '--env', 'FOO=a b', '--python', 'py3',
                         '--log', 'runs/gpu.log'], trap)
  pip = _find(cmds, 'pip', 'install')
  assert cmds[pip] == ['py3', '-m', 'pip', 'install', '-e', '.[cuda]']
  main = _find(cmds, 'diffmix_jax.main')
  assert pip < main
  assert {'CUDA_VISIBLE_DEVICES=0,1', 'XLA_PYTHON_CLIENT_MEM_FRACTION=0.75', 'FOO=a b'} <= set(cmds[main])
  assert cmds[main][-5:] == ['2>&1', '|', 'tee', '-a', 'runs/gpu.log']


def test_gpu_real_run_passes_env_and_exit_status(tmp_path):
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  _write_exe(bin_dir / 'fakepy', '#!/usr/bin/env bash\n'
             'echo "args: $* mem=$XLA_PYTHON_CLIENT_MEM_FRACTION nccl=$NCCL_DEBUG"\nexit 7\n')
  log = tmp_path / 'gpu.log'
  res = _run('gpu.sh', ['--python', str(bin_dir / 'fakepy'), '--config', 'c.py', '--workdir', 'w',
                        '--log', str(log), '--', '--config.seed=3'])
  assert res.returncode == 7, res.stderr
  assert 'args: -m diffmix_jax.main --config c.py --workdir w --config.seed=3 mem=0.9 nccl=WARN' in (
      log.read_text())


# ---- tpu_vm.sh ----

@pytest.mark.parametrize('accelerator', ['v4-8', 'v4-32'])
def test_tpu_dry_run_prints_every_step(accelerator, trap):
  args = [*BASE_ARGS['tpu_vm.sh'], '--accelerator-type', accelerator, '--project', 'my-proj',
          '--run-id', 'r1', '--log-dir', 'runs/launch/tpu-logs', '--delete', '--', *PASSTHROUGH]
  cmds = _dry('tpu_vm.sh', args, trap)
  gcloud = [c for c in cmds if c[0] == 'gcloud']
  assert gcloud and all(c[:4] == ['gcloud', 'compute', 'tpus', 'tpu-vm'] for c in gcloud)
  assert all('--zone=us-central2-b' in c and '--project=my-proj' in c for c in gcloud)

  create = _find(cmds, 'create', 'diffmix-v4-32')
  assert f'--accelerator-type={accelerator}' in cmds[create]
  assert '--version=tpu-ubuntu2204-base' in cmds[create]
  pack = _find(cmds, 'tar', '-C', str(ROOT))
  copy = _find(cmds, 'scp', '--worker=all')
  archive = cmds[pack][cmds[pack].index('-czf') + 1]
  assert archive in cmds[copy]
  unpack = _find(cmds, 'ssh', '--worker=all', start=copy)
  assert 'tar -xzf' in cmds[unpack][-1]
  install = _find(cmds, 'ssh', '--worker=all', start=unpack + 1)
  assert 'pip install' in cmds[install][-1] and '.[tpu]' in cmds[install][-1]
  run = _find(cmds, 'ssh', '--worker=all', start=install + 1)
  command = cmds[run][-1]
  assert command.startswith('--command=')
  remote = shlex.split(command[len('--command='):].split(' 2>&1 | tee ')[0].split(' && ')[-1])
  assert remote == ['.venv/bin/python', '-m', 'diffmix_jax.main', '--config', 'configs/consep.py',
                    '--workdir', '/mnt/diffmix/consep', '--config.mesh.distributed=True', *PASSTHROUGH]
  assert 'logs/r1.log' in command  # Every worker keeps its own log.
  collect = _find(cmds, 'ssh', '--worker=all', '--output-directory=runs/launch/tpu-logs', start=run + 1)
  assert '--command=cat diffmix_jax/logs/r1.log' in cmds[collect]
  assert _find(cmds, 'mkdir', '-p', 'runs/launch/tpu-logs') < collect
  delete = _find(cmds, 'delete', 'diffmix-v4-32', '--quiet')
  assert create < pack < copy < unpack < install < run < collect < delete == len(cmds) - 1


def test_tpu_dry_run_skips(trap):
  cmds = _dry('tpu_vm.sh', [*BASE_ARGS['tpu_vm.sh'], '--skip-create', '--skip-install'], trap)
  assert not any('create' in c for c in cmds)
  assert not any('pip install' in ' '.join(c) for c in cmds)
  assert not any('delete' in c for c in cmds)  # Only with --delete.
  assert '--project' not in ' '.join(' '.join(c) for c in cmds)  # gcloud's own project by default.
  _find(cmds, 'scp', '--worker=all')
  _find(cmds, 'ssh', '--worker=all', '--output-directory=' + _dry_log_dir(cmds))


def _dry_log_dir(cmds) -> str:
  return next(c[-1] for c in cmds if c[:2] == ['mkdir', '-p'])


def test_tpu_real_run_reports_failed_worker(tmp_path):
  """Real code path against a fake gcloud: the VM is created, logs collected, a failed worker seen."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  record = tmp_path / 'gcloud_calls.txt'
  _write_exe(bin_dir / 'gcloud', f'''#!/usr/bin/env bash
echo "$*" >> {shlex.quote(str(record))}
[[ " $* " == *" describe "* ]] && exit 1
for a in "$@"; do
  case $a in
    --output-directory=*) d=${{a#*=}}
      printf 'worker 0 output\\n[launch] exit status 0\\n' > "$d/0.log"
      printf 'worker 1 output\\n[launch] exit status 1\\n' > "$d/1.log" ;;
  esac
done
exit 0
''')
  log_dir = tmp_path / 'logs'
  res = _run('tpu_vm.sh', [*BASE_ARGS['tpu_vm.sh'], '--run-id', 'r2', '--log-dir', str(log_dir)],
             env=_env(bin_dir, TMPDIR=str(tmp_path)))
  assert res.returncode == 1, res.stderr
  assert 'worker 1: exit status 1' in res.stderr
  calls = record.read_text().splitlines()
  verbs = [c.split()[3] for c in calls]
  assert verbs == ['describe', 'create', 'scp', 'ssh', 'ssh', 'ssh', 'ssh'], calls
  assert (log_dir / '0.log').exists()
  assert not list(tmp_path.glob('diffmix_jax_src-*.tgz'))  # The local archive is removed.


def test_tpu_real_run_stops_on_a_preempted_vm(tmp_path):
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  _write_exe(bin_dir / 'gcloud', '#!/usr/bin/env bash\n'
             '[[ " $* " == *" describe "* ]] && { echo PREEMPTED; exit 0; }\nexit 9\n')
  res = _run('tpu_vm.sh', BASE_ARGS['tpu_vm.sh'], env=_env(bin_dir, TMPDIR=str(tmp_path)))
  assert res.returncode == 2
  assert "state 'PREEMPTED'" in res.stderr and 'tpu-vm delete diffmix-v4-32' in res.stderr


# ---- multihost.sh ----

def _remote_main(ssh_cmd: list[str]) -> list[str]:
  """The words of `python -m diffmix_jax.main ...` inside a printed `ssh HOST 'cd DIR && env ...'`."""
  remote = ssh_cmd[ssh_cmd.index('<') - 1]
  words = shlex.split(remote.split(' && ', 1)[1])
  return words[words.index('-m') - 1:]


def test_multihost_dry_run_two_hosts(trap):
  args = [*BASE_ARGS['multihost.sh'], '--log-dir', 'runs/launch/mh', '--', *PASSTHROUGH]
  cmds = _dry('multihost.sh', args, trap)
  runs = [c for c in cmds if c[0] == 'ssh' and 'diffmix_jax.main' in ' '.join(c)]
  assert len(runs) == 2
  for i, (cmd, host) in enumerate(zip(runs, ['me@gpu-a', 'gpu-b'])):
    assert host in cmd
    main = _remote_main(cmd)
    assert main[:8] == ['python3', '-m', 'diffmix_jax.main', '--config', 'configs/consep.py',
                        '--workdir', '/nfs/diffmix/consep', '--config.mesh.distributed=True']
    assert '--config.mesh.coordinator_address=gpu-a:8476' in main
    assert '--config.mesh.num_processes=2' in main
    assert f'--config.mesh.process_id={i}' in main
    assert main[-2:] == PASSTHROUGH
    assert cmd[-4:] == ['>', f'runs/launch/mh/host{i}.log', '2>&1', '&']
  assert cmds[-1] == ['wait']
  assert not any('pip install' in ' '.join(c) or c[0] == 'rsync' for c in cmds)  # Only with --install/--sync.


def test_multihost_dry_run_options(trap):
  args = [*BASE_ARGS['multihost.sh'], '--coordinator-address', '10.0.0.5:9999', '--sync', '--install',
          '--ssh', 'ssh -p 2222', '--remote-dir', '/srv/diffmix', '--python', '/venv/bin/python']
  cmds = _dry('multihost.sh', args, trap)
  assert [c[-2] for c in cmds if c[0] == 'rsync'] == [f'{ROOT}/'] * 2
  pips = [c for c in cmds if 'pip install' in c[-1]]
  assert [c[3] for c in pips] == ['me@gpu-a', 'gpu-b']
  assert pips[0][-1] == 'cd /srv/diffmix && /venv/bin/python -m pip install -e ".[cuda]"'
  runs = [c for c in cmds if 'diffmix_jax.main' in ' '.join(c)]
  assert all(c[:3] == ['ssh', '-p', '2222'] for c in runs)
  assert all('--config.mesh.coordinator_address=10.0.0.5:9999' in _remote_main(c) for c in runs)
  assert _remote_main(runs[0])[0] == '/venv/bin/python'


def test_multihost_waits_for_all_and_fails_if_one_fails(tmp_path):
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  ssh = _write_exe(bin_dir / 'fakessh', '#!/usr/bin/env bash\nshift\nexec bash -c "$*"\n')
  py = _write_exe(bin_dir / 'fakepy', '#!/usr/bin/env bash\n'
                  'case "$*" in *process_id=1*) echo "host 1 breaks"; exit 3 ;; esac\n'
                  'sleep 1; echo "finished $*"\n')
  log_dir = tmp_path / 'logs'
  res = _run('multihost.sh', ['--hosts', 'a,b,c', '--ssh', str(ssh), '--python', str(py),
                              '--remote-dir', str(tmp_path), '--config', 'c.py', '--workdir', 'w',
                              '--log-dir', str(log_dir)])
  assert res.returncode == 1, res.stderr
  assert 'host1 b: FAILED (exit status 3)' in res.stderr and 'host 1 breaks' in res.stderr
  for i in (0, 2):  # The others ran to the end: the script waited for them.
    text = (log_dir / f'host{i}.log').read_text()
    assert 'finished -m diffmix_jax.main' in text and f'--config.mesh.process_id={i}' in text


def test_multihost_real_two_processes_over_localhost(tmp_path):
  """Two real `main` processes (no stages) meet through jax.distributed at the coordinator."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  ssh = _write_exe(bin_dir / 'fakessh', '#!/usr/bin/env bash\nshift\nexec bash -c "$*"\n')
  workdir, log_dir = tmp_path / 'workdir', tmp_path / 'logs'
  res = _run('multihost.sh', ['--hosts', '127.0.0.1,127.0.0.1', '--port', str(port), '--ssh', str(ssh),
                              '--python', sys.executable, '--config', 'configs/tiny.py', '--workdir',
                              str(workdir), '--log-dir', str(log_dir), '--',
                              '--config.stages=', '--config.mesh.initialization_timeout=60',
                              '--config.mesh.heartbeat_timeout=20'],
             env=_env(None, JAX_PLATFORMS='cpu'), timeout=HANG_TIMEOUT)
  logs = {i: (log_dir / f'host{i}.log').read_text() for i in (0, 1)}
  assert res.returncode == 0, f'{res.stderr}\n{logs}'
  for i in (0, 1):
    assert f'process {i}/2' in logs[i], logs[i]
  assert (workdir / 'config.json').exists()


# ---- launch/README.md ----

def test_readme_commands_are_valid(trap):
  """Every shell block of launch/README.md runs as a dry run: flags exist, required ones are given."""
  text = (LAUNCH / 'README.md').read_text()
  blocks = re.findall(r'```bash\n(.*?)```', text, flags=re.S)
  assert len(blocks) >= 3
  for script in SCRIPTS:
    assert f'launch/{script}' in text
  for block in blocks:
    dry = re.sub(r'(launch/\w+\.sh)(?=\s)', r'\1 --dry-run', block)
    res = subprocess.run(['bash', '-euc', dry], capture_output=True, text=True, env=_env(trap[0]),
                         cwd=ROOT, timeout=HANG_TIMEOUT)
    assert res.returncode == 0, f'{block}\n{res.stderr}'
    assert 'diffmix_jax.main' in res.stdout
  assert not trap[1].exists()
