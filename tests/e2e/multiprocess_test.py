"""Multi-process `main` over 127.0.0.1 equals the single-process run; a killed process fails fast.

Each run starts N processes of `python -m diffmix_jax.main --config configs/tiny.py` with
`--config.mesh.distributed=True`, 2 simulated CPU devices each, on one workdir; they train the SDM,
mix labels, render the synthetic set and evaluate. The single-process reference is the `sampled`
workdir of conftest.py (8 devices) plus `evaluate` by one `main` of 2 devices. Evaluation uses an
untrained HoVer-Net written once (training one would cost minutes; the metrics check how the test
tiles are split over processes, not how good the network is). The 2-process run is first killed
mid-training (one process gets SIGKILL), then rerun: it covers fail-fast, resume and equality at
once. Per-step previews are off (`sample_every_steps=0`) and so is the synthetic-fidelity scoring:
neither changes what is compared, both add work.

The 4-process run (the whole chain again: its SDM losses, synthetic set and metrics each equal the
single-process ones) is in the slow tier (DIFFMIX_SLOW_TESTS=1, SLOW_COMMAND below): every process
compiles every program (JAX writes its CPU compilation cache from process 0 only, under keys that
differ per process: they hash the CPU topology's fingerprint, which differs; for the same reason
`jax_share_binary_between_hosts` leaves process 1 waiting for a binary that never comes), so 4 more
processes cost minutes of CPU, more than the default suite's 15-min budget on 2 cores has left. The
2-process run checks the same split-and-gather code.
"""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

from flax import serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from conftest import copy_workdir
from conftest import HANG_TIMEOUT
from conftest import xla_flags
from conftest import finish_processes
from conftest import free_port
from conftest import tensorboard_scalars
from diffmix_jax.data import input_pipeline
from diffmix_jax.stages import sample
from diffmix_jax import workdir as wdir
from diffmix_jax.data import synthetic as synthetic_io
from diffmix_jax.hovernet import model as hovernet

# One worker runs this module: its fixtures are module-scoped multi-process runs.
pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.xdist_group('multiprocess')]

ROOT = pathlib.Path(__file__).resolve().parents[2]
STAGES = 'diffusion_train,mix_labels,sample,evaluate'
RUN = 'baseline'  # One HoVer-Net run is enough to check how evaluation is split.
KILL_HEARTBEAT = 10  # Seconds: config.mesh.heartbeat_timeout of the run that loses a process.
RUN_TIMEOUT = HANG_TIMEOUT  # A hang only: one multi-process run takes ~1-6 min on 2 loaded cores.
FIXTURES = {2: 'two_processes', 4: 'four_processes'}
LOCAL_DEVICES = 2  # Simulated CPU devices in each process of `main`.


def _config():
  c = tiny.get_config()
  c.hovernet.train.runs = (RUN,)
  return c


def _write_untrained_hovernet(config, workdir: pathlib.Path) -> None:
  """A finished `hovernet_<RUN>` folder holding freshly initialised variables."""
  module = hovernet.create_hovernet(**config.hovernet.model)
  size = module.patch_shapes[0]
  variables = jax.device_get(module.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
  out = wdir.StageDir(workdir, f'hovernet_{RUN}')
  out.write_bytes(wdir.HOVERNET_VARIABLES, serialization.to_bytes(variables))
  out.mark_done({'untrained': True})


@pytest.fixture(scope='module')
def reference(sampled, tmp_path_factory):
  """`sampled` (one process, 8 devices) plus `evaluate` of the untrained HoVer-Net by one `main`.

  The evaluation runs in one process with the LOCAL_DEVICES devices of each multi-process run: XLA
  CPU's convolutions round differently with the number of devices in a process (the untrained
  network's outputs differ by ~3e-4 between 8 and 2 devices, and near-threshold pixels flip), while
  2 processes of 2 devices compute outputs bit-identical to one process of 2. So any difference in
  the metrics comes from how the tiles are split over the processes and gathered.
  """
  workdir = copy_workdir(sampled, tmp_path_factory.mktemp('mp_reference') / 'w',
                         skip=('checkpoints',))
  _write_untrained_hovernet(_config(), workdir)
  (rc, log), = finish_processes(_start(1, workdir, 'evaluate', stages='evaluate'), RUN_TIMEOUT)
  assert rc == 0, log[-3000:]
  return workdir


def _fresh_workdir(reference: pathlib.Path, path: pathlib.Path) -> pathlib.Path:
  """The built dataset and the HoVer-Net variables of the reference; every other stage to run."""
  for name in ('build_data', 'tfds', f'hovernet_{RUN}'):
    shutil.copytree(reference / name, path / name)
  return path


def _start(n: int, workdir: pathlib.Path, tag: str, heartbeat: int = 30,
           stages: str = STAGES) -> list:
  """Starts n processes of `main` on `workdir`; output goes to `<workdir>.<tag>.<i>.log`.

  Files, not pipes: the processes wait for each other in collectives, so one blocked on a full pipe
  that nobody reads would stall all of them.
  """
  env = dict(os.environ, XLA_FLAGS=xla_flags(LOCAL_DEVICES))
  port = free_port()
  procs = []
  for i in range(n):
    log = pathlib.Path(f'{workdir}.{tag}.{i}.log')
    mesh = [] if n == 1 else [  # One process runs undistributed.
        '--config.mesh.distributed=True', f'--config.mesh.coordinator_address=127.0.0.1:{port}',
        f'--config.mesh.num_processes={n}', f'--config.mesh.process_id={i}',
        '--config.mesh.initialization_timeout=120', f'--config.mesh.heartbeat_timeout={heartbeat}']
    with open(log, 'w') as f:
      proc = subprocess.Popen(
          [sys.executable, '-m', 'diffmix_jax.main', '--config', 'configs/tiny.py', '--workdir',
           str(workdir), f'--config.stages={stages}', f'--config.hovernet.train.runs={RUN}',
           '--config.diffusion.train.sample_every_steps=0',
           '--config.eval.synthetic_fidelity=False', *mesh],
          cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    proc.log = log
    procs.append(proc)
  return procs


def _report(results) -> str:
  return '\n\n'.join(f'--- process {i} (exit {rc}):\n{log[-2500:]}'
                     for i, (rc, log) in enumerate(results))


@pytest.fixture(scope='module')
def two_processes(reference, tmp_path_factory):
  """2 processes: process 1 is killed after the first checkpoint, then both are rerun to the end."""
  workdir = _fresh_workdir(reference, tmp_path_factory.mktemp('mp2') / 'w')
  every = _config().diffusion.train.checkpoint_every_steps
  first = workdir / 'diffusion' / 'checkpoints' / str(every)
  procs = _start(2, workdir, 'killed', heartbeat=KILL_HEARTBEAT)
  try:
    deadline = time.time() + RUN_TIMEOUT
    while not first.is_dir() and all(p.poll() is None for p in procs) and time.time() < deadline:
      time.sleep(0.1)
  except BaseException:
    finish_processes(procs, 0)
    raise
  if not all(p.poll() is None for p in procs) or not first.is_dir():
    pytest.fail('the run did not reach its first checkpoint alive:\n' +
                _report(finish_processes(procs, 0)))
  procs[1].send_signal(signal.SIGKILL)
  killed_at = time.time()
  survivor = finish_processes(procs[:1], HANG_TIMEOUT)[0]
  elapsed = time.time() - killed_at
  print(f'the survivor stopped {elapsed:.1f} s after the kill (heartbeat timeout {KILL_HEARTBEAT} s)')
  finish_processes(procs[1:], HANG_TIMEOUT)
  kill = {'survivor': survivor, 'elapsed': elapsed,
          'done_after_kill': (workdir / 'diffusion' / 'DONE').exists()}
  rerun = finish_processes(_start(2, workdir, 'rerun'), RUN_TIMEOUT)
  return {'workdir': workdir, 'kill': kill, 'results': rerun}


SLOW = bool(os.environ.get('DIFFMIX_SLOW_TESTS'))
SLOW_COMMAND = ('DIFFMIX_SLOW_TESTS=1 python -m pytest -q -n 0 tests/e2e/multiprocess_test.py '
                '(the whole module: 7 min 7 s on 2 cores)')


@pytest.fixture(scope='module')
def four_processes(reference, tmp_path_factory):
  """4 processes, uninterrupted, the whole chain (slow tier only)."""
  workdir = _fresh_workdir(reference, tmp_path_factory.mktemp('mp4') / 'w')
  return {'workdir': workdir, 'results': finish_processes(_start(4, workdir, 'run'), RUN_TIMEOUT)}


def test_killing_a_process_stops_the_others_through_the_heartbeat(two_processes):
  """The survivor stops by itself with an error (not killed by the test for a hang), and says why:
  the coordination service saw the dead process's heartbeats stop. How long it took is printed
  (`-s`), not judged."""
  kill = two_processes['kill']
  rc, log = kill['survivor']
  assert rc is not None, f'the survivor hung after its peer was killed:\n{log[-3000:]}'
  assert rc != 0, log[-3000:]
  assert re.search(r'another task died|stopped sending heartbeats', log), log[-3000:]
  assert not kill['done_after_kill']


def test_rerun_after_the_kill_resumes_from_the_last_checkpoint_and_finishes(two_processes):
  results = two_processes['results']
  assert [rc for rc, _ in results] == [0, 0], _report(results)
  tc = _config().diffusion.train
  for _, log in results:
    steps = [int(s) for s in re.findall(r'diffusion_train: resumed from step (\d+)', log)]
    assert len(steps) == 1, log[-3000:]
    assert steps[0] % tc.checkpoint_every_steps == 0 or steps[0] == tc.phase1_steps, steps
  for stage in ('diffusion', 'mixed_labels', 'synthetic', 'eval'):
    assert (two_processes['workdir'] / stage / 'DONE').exists(), stage


def _run(request, n):
  if n == 4 and not SLOW:
    pytest.skip(f'the 4-process run is in the slow tier: {SLOW_COMMAND}')
  run = request.getfixturevalue(FIXTURES[n])
  assert [rc for rc, _ in run['results']] == [0] * n, _report(run['results'])
  return run['workdir']


def _losses(workdir: pathlib.Path) -> dict[int, float]:
  """step -> loss from TensorBoard; a step logged again after a resume keeps its last value."""
  return tensorboard_scalars(workdir / 'diffusion' / 'tb')['loss']


@pytest.mark.parametrize('n', [2, 4])
def test_training_losses_equal_one_process(n, request, reference):
  """Step by step, to 1e-5.

  The weights are not compared leaf by leaf: Adam turns the rounding noise of near-zero gradients
  into whole-step differences of a few parameters. The synthetic images show the EMAs act alike.
  """
  workdir = _run(request, n)
  config = _config()
  total = config.diffusion.train.phase1_steps + config.diffusion.train.phase2_steps
  one, multi = _losses(reference), _losses(workdir)
  assert sorted(one) == sorted(multi) == list(range(1, total + 1))
  np.testing.assert_allclose([multi[s] for s in sorted(one)], [one[s] for s in sorted(one)],
                             atol=1e-5, rtol=0)
  assert (workdir / 'diffusion' / wdir.EMA_PARAMS).exists()


def _shards(workdir: pathlib.Path) -> list[dict]:
  count = len(list((workdir / 'synthetic' / 'shards').glob('shard_*.npz')))
  return [synthetic_io.read_shard(workdir, k) for k in range(count)]


@pytest.mark.parametrize('n', [2, 4])
def test_synthetic_set_is_complete_and_equals_one_process(n, request, reference):
  workdir = _run(request, n)
  config = _config()
  tiles = {t['name']: t for t in input_pipeline.load_split(config, str(reference), 'train')}
  items = sample.work_items(config, str(reference), tiles)
  got, want = _shards(workdir), _shards(reference)
  assert len(got) == len(want) == -(-len(items) // config.sample.shard_size)
  index = np.concatenate([s['index'] for s in got])
  np.testing.assert_array_equal(index, np.arange(len(items)))  # Each patch once, none missing.
  for a, b in zip(got, want):
    for key in synthetic_io.SHARD_KEYS:
      if key != 'image':  # Same items: kind, tile, patch, offset and mixed labels.
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  # The EMA weights agree to ~1e-8 across device and process counts; the uint8 images were identical
  # when measured, and may at most differ by one grey level on a few values that round differently.
  image = lambda shards: np.concatenate([s['image'] for s in shards]).astype(np.int16)
  diff = np.abs(image(got) - image(want))
  assert diff.max() <= 1 and np.mean(diff > 0) <= 1e-3, (diff.max(), np.mean(diff > 0))
  # Process 0 alone wrote the merged outputs, each once.
  assert len(synthetic_io.open_source(workdir)) == len(items)
  assert len(list((workdir / 'synthetic' / 'consep_format' / 'Labels').glob('*.mat'))) == len(items)
  assert (workdir / 'synthetic' / 'DONE').exists()


@pytest.mark.parametrize('n', [2, 4])
def test_evaluate_metrics_equal_one_process(n, request, reference):
  workdir = _run(request, n)
  want = json.loads((reference / 'eval' / f'{RUN}.json').read_text())
  got = json.loads((workdir / 'eval' / f'{RUN}.json').read_text())
  assert want['num_pred'] > 0 and want['dice'] > 0  # The untrained network does find nuclei.
  tiles = len(input_pipeline.load_split(_config(), str(reference), 'test'))
  assert got['num_images'] == tiles and sorted(got['per_image']) == sorted(want['per_image'])
  assert _close(got, want), (got, want)
  for folder in ('pred', 'true'):  # Every tile predicted once, by one of the processes.
    assert len(list((workdir / 'eval' / RUN / folder).glob('*.mat'))) == tiles


def _close(got, want) -> bool:
  """Nested dicts of numbers equal to 1e-6."""
  if isinstance(want, dict):
    return set(got) == set(want) and all(_close(got[k], want[k]) for k in want)
  return got == pytest.approx(want, abs=1e-6, rel=0)
