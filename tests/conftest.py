"""Shared pytest set-up: 8 simulated CPU devices, a persistent compile cache, real-data discovery."""

import os
import pathlib
import sys
import tempfile

# Must happen before jax is imported anywhere. The suite checks behaviour, not speed, and most of its
# CPU time is XLA compiling programs that then run a few steps: LLVM's optimisation off compiles
# them in about half the time (CONTRIBUTING.md). `xla_flags` passes the same to subprocesses.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8 '
                      '--xla_backend_optimization_level=0')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), 'diffmix_jax_test_jit_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
# glibc's malloc backs its large blocks (XLA's buffers, fresh for every call of a program) with
# transparent huge pages: the suite's processes then spend about half as much system time in page
# faults (CONTRIBUTING.md). Read by glibc when a process starts, so it reaches the xdist workers
# and every subprocess a test starts, not this process; other glibc tunables set by the user stay.
_TUNABLE = 'glibc.malloc.hugetlb=1'
if _TUNABLE not in os.environ.get('GLIBC_TUNABLES', ''):
  os.environ['GLIBC_TUNABLES'] = ':'.join(
      t for t in (os.environ.get('GLIBC_TUNABLES', ''), _TUNABLE) if t)

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402


@pytest.fixture(scope='session')
def consep_dir() -> pathlib.Path:
  """The real CoNSeP folder named by $DIFFMIX_CONSEP_DIR; skips the test when it is unset."""
  path = os.environ.get('DIFFMIX_CONSEP_DIR', '')
  if not path:
    pytest.skip('DIFFMIX_CONSEP_DIR is not set (real CoNSeP tests need it; .ci/run sets it when '
                '../shared/data/consep exists)')
  p = pathlib.Path(path)
  if not (p / 'Train').is_dir():
    pytest.fail(f'DIFFMIX_CONSEP_DIR={path} has no Train/ folder')
  return p


def shared_workdir(tmp_path_factory, name: str, build) -> pathlib.Path:
  """A folder that `build(folder)` fills once per test session, also across pytest-xdist workers.

  Under xdist the workers share the session's base temp folder's parent; a file lock makes the first
  worker that needs the folder build it while the others wait, then all read the same files. A
  build that fails leaves no `.ready` marker, so the next test that needs it builds it again.
  """
  import filelock  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    root = root.parent
  folder, ready = root / f'shared_{name}', root / f'shared_{name}.ready'
  with filelock.FileLock(str(root / f'shared_{name}.lock')):
    if not ready.exists():
      shutil.rmtree(folder, ignore_errors=True)
      folder.mkdir()
      build(folder)
      ready.touch()
  return folder


@pytest.fixture(scope='session')
def tiny_built(tmp_path_factory) -> pathlib.Path:
  """A workdir of configs/tiny.py after build_data alone (in process, a few seconds): for the tests
  that read the built demo set and need no trained SDM (the fast tier builds no SDM)."""
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from diffmix_jax.stages import build_data  # pylint: disable=g-import-not-at-top
  return shared_workdir(tmp_path_factory, 'tiny_built',
                        lambda workdir: build_data.run(tiny.get_config(), str(workdir)))


@pytest.fixture(scope='session')
def tiny_trained(tiny_built, tmp_path_factory) -> pathlib.Path:
  """A workdir of configs/tiny.py after build_data (`tiny_built`'s), diffusion_train and mix_labels
  (in process).

  Built once per session (`shared_workdir`); tests that write into a workdir copy it first
  (`copy_workdir`).
  """
  import shutil  # pylint: disable=g-import-not-at-top
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from diffmix_jax.stages import diffusion_train  # pylint: disable=g-import-not-at-top
  from diffmix_jax.stages import mix_labels  # pylint: disable=g-import-not-at-top

  def build(workdir):
    shutil.copytree(tiny_built, workdir, dirs_exist_ok=True)
    config = tiny.get_config()
    for stage in (diffusion_train, mix_labels):
      stage.run(config, str(workdir))
  return shared_workdir(tmp_path_factory, 'tiny_trained', build)


def copy_workdir(src: pathlib.Path, dst: pathlib.Path, skip=()) -> pathlib.Path:
  """Copies a workdir (without the stage folders in `skip`)."""
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.copytree(src, dst, ignore=lambda d, names: [n for n in names if n in skip])
  return dst


def xla_flags(devices: int | None = None, optimize: bool = False) -> str:
  """The suite's XLA_FLAGS for a subprocess with `devices` simulated CPU devices (None: XLA's one).

  `optimize`: XLA's default LLVM optimisation instead of the suite's level 0, for a subprocess
  that runs one program for many steps (there the faster code outweighs the longer compile).
  """
  import re  # pylint: disable=g-import-not-at-top
  rest = re.sub(r'--xla_force_host_platform_device_count=\d+', '', os.environ.get('XLA_FLAGS', ''))
  if optimize:
    rest = re.sub(r'--xla_backend_optimization_level=\d+', '', rest)
  count = f'--xla_force_host_platform_device_count={devices} ' if devices else ''
  return (count + rest.strip()).strip()


def finish_processes(procs: list, timeout: float) -> list[tuple[int | None, str]]:
  """Waits for every process (killing all that are left after `timeout`); (exit code, log) each.

  Each process carries `.log`, the file its output goes to (files, not pipes: processes that wait
  for each other in collectives would stall behind one blocked on a full pipe). A process killed
  here for a hang gets the exit code None, never its SIGKILL status, so a hang cannot pass for a
  process that stopped by itself.
  """
  import subprocess  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  deadline = time.time() + timeout
  hung = set()
  try:
    for p in procs:
      p.wait(timeout=max(deadline - time.time(), 1))
  except subprocess.TimeoutExpired:
    pass
  finally:
    for k, p in enumerate(procs):
      if p.poll() is None:
        hung.add(k)
        p.kill()
        p.wait()
  return [(None if k in hung else p.returncode, p.log.read_text(errors='replace'))
          for k, p in enumerate(procs)]


def free_port() -> int:
  """A TCP port on 127.0.0.1 free right now (for a jax.distributed coordinator)."""
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def tensorboard_scalars(logdir: pathlib.Path) -> dict[str, dict[int, float]]:
  """tag -> step -> value of every scalar a CLU writer logged in `logdir` (images left out); a step
  logged again after a resume keeps its last value."""
  # pylint: disable=g-import-not-at-top
  from tensorboard.backend.event_processing import event_accumulator
  import numpy as np
  import tensorflow as tf
  acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={'tensors': 0})
  acc.Reload()
  out = {}
  for tag in acc.Tags()['tensors']:
    values = {e.step: tf.make_ndarray(e.tensor_proto) for e in acc.Tensors(tag)}
    if all(np.ndim(v) == 0 for v in values.values()):
      out[tag] = {step: float(v) for step, v in values.items()}
  return out


def file_snapshot(folder: pathlib.Path, same_bytes_only=(), skip_dirs=()) -> dict:
  """{path: (mtime_ns, bytes)} of every file under `folder`, to prove a rerun wrote nothing.

  Files named in `same_bytes_only` may be rewritten with the same bytes (their mtime is left out);
  folders named in `skip_dirs` are not read.
  """
  return {p: (0 if p.name in same_bytes_only else p.stat().st_mtime_ns, p.read_bytes())
          for p in sorted(folder.rglob('*'))
          if p.is_file() and not set(skip_dirs) & set(p.parts)}


def rescore_from_files(eval_run_dir: pathlib.Path) -> dict:
  """What `evaluate` must have written for one run, recomputed here from its saved .mat files with
  plain NumPy (not diffmix_jax.metrics): mean over images of the foreground Dice 2|T & P| / (|T| +
  |P|), the instance counts of truth and prediction, and the number of images.

  Args:
    eval_run_dir: `<workdir>/eval/<run>`, holding `true/*.mat` and `pred/*.mat` (`inst_map`).
  """
  from scipy import io as sio  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  dices, n_true, n_pred = [], 0, 0
  preds = sorted((eval_run_dir / 'pred').glob('*.mat'))
  for pred_path in preds:
    t = sio.loadmat(eval_run_dir / 'true' / pred_path.name)['inst_map']
    p = sio.loadmat(pred_path)['inst_map']
    both = np.count_nonzero((t > 0) & (p > 0))
    total = np.count_nonzero(t > 0) + np.count_nonzero(p > 0)
    dices.append(2 * both / total if total else 1.0)
    n_true += len(np.unique(t[t > 0]))
    n_pred += len(np.unique(p[p > 0]))
  return {'dice': float(np.mean(dices)), 'num_true': n_true, 'num_pred': n_pred,
          'num_images': len(preds)}


@pytest.fixture(scope='session')
def sampled(tiny_trained, tmp_path_factory) -> pathlib.Path:
  """A copy of `tiny_trained` after an uninterrupted, in-process run of the sample stage."""
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from diffmix_jax.stages import sample  # pylint: disable=g-import-not-at-top

  def build(folder):
    workdir = copy_workdir(tiny_trained, folder / 'w', skip=('synthetic',))
    sample.run(tiny.get_config(), str(workdir))
  return shared_workdir(tmp_path_factory, 'sampled', build) / 'w'


def pytest_xdist_auto_num_workers(config) -> int:
  """`-n auto`: one worker per usable core, at most 4 (each holds JAX, TF and 8 CPU devices)."""
  del config
  return max(1, min(len(os.sched_getaffinity(0)), 4))


# Seconds after which a subprocess a test started is taken to hang (and the test fails): over 10x
# the longest normal run (the CoNSeP smoke chain, ~5 min on 2 loaded cores), so only a real hang
# reaches it. Every subprocess wait in tests/ uses it or a multiple; pyproject's `timeout` (the
# pytest-timeout plugin) is the same bound for a test as a whole. Durations are reported
# (`--durations` in pyproject's addopts), never judged: no verdict depends on wall-clock time.
HANG_TIMEOUT = 3600


def pytest_collection_modifyitems(config, items) -> None:
  """Longest work first, so that two workers finish together.

  The multi-process group first (its worker builds the shared tiny workdirs on the way), then slow
  tests that need no shared workdir (the other worker is busy meanwhile), then slow tests that read
  the shared workdirs (built by then), then the rest. A stable sort: file order within each rank.
  """
  del config
  shared = {'tiny_trained', 'sampled'}

  def rank(item) -> int:
    if item.get_closest_marker('xdist_group') is not None:
      return 0
    if item.get_closest_marker('slow') is None:
      return 3
    return 2 if shared & set(item.fixturenames) else 1
  items.sort(key=rank)


# jax.monitoring duration events -> seconds so far in this process (DIFFMIX_TEST_CPU_LOG only).
_JAX_SECONDS = {}
_JAX_EVENTS = {'/jax/core/compile/backend_compile_duration': 'compile_s',
               '/jax/core/compile/jaxpr_trace_duration': 'trace_s'}


def _jax_seconds() -> dict:
  """In-process XLA compile and jaxpr trace seconds so far (listener registered on first call)."""
  if not _JAX_SECONDS:
    from jax import monitoring  # pylint: disable=g-import-not-at-top
    _JAX_SECONDS.update({k: 0.0 for k in _JAX_EVENTS.values()})

    def listen(event, seconds, **kwargs):
      del kwargs
      if event in _JAX_EVENTS:
        _JAX_SECONDS[_JAX_EVENTS[event]] += seconds
    monitoring.register_event_duration_secs_listener(listen)
  return dict(_JAX_SECONDS)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
  """With $DIFFMIX_TEST_CPU_LOG set, appends each test's CPU seconds (setup, call and teardown, its
  waited-for subprocesses included) to that file as JSON lines, with the seconds this process spent
  in XLA compiles and jaxpr tracing (subprocesses' not included): where the suite's budget goes,
  reported, never judged."""
  path = os.environ.get('DIFFMIX_TEST_CPU_LOG')
  if not path:
    return (yield)
  import json  # pylint: disable=g-import-not-at-top
  import resource  # pylint: disable=g-import-not-at-top

  def cpu() -> float:
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))
  start, jax_start = cpu(), _jax_seconds()
  result = yield
  record = {'test': item.nodeid, 'cpu_s': round(cpu() - start, 2)}
  record.update({k: round(v - jax_start[k], 2) for k, v in _jax_seconds().items()})
  with open(path, 'a') as f:
    f.write(json.dumps(record) + '\n')
  return result
