"""Tests through the real `main` entry point."""

import functools
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

from configs import common
from conftest import HANG_TIMEOUT
from conftest import xla_flags
from diffmix_jax import main
from diffmix_jax import workdir as wdir

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_main(*args, timeout=HANG_TIMEOUT, env=None):
  return subprocess.run([sys.executable, '-m', 'diffmix_jax.main', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout, env=env)


def _one_device_env() -> dict:
  """The environment without the suite's 8 simulated CPU devices: `main` as a user runs it."""
  env = dict(os.environ)
  env['XLA_FLAGS'] = xla_flags()
  return env


@pytest.mark.slow
def test_demo_data_stage_and_noop_rerun(tmp_path):
  workdir = tmp_path / 'demo'
  out = run_main('--config', 'configs/demo.py', '--workdir', str(workdir),
                 '--config.stages=build_data')
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.loads((workdir / 'build_data' / 'summary.json').read_text())
  assert summary['splits']['train']['tiles'] == 32
  assert (workdir / 'build_data' / 'DONE').exists()
  assert json.loads((workdir / 'config.json').read_text())['data']['name'] == 'demo_nuclei'
  assert 'build_data' in json.loads((workdir / 'timings.json').read_text())
  again = run_main('--config', 'configs/demo.py', '--workdir', str(workdir),
                   '--config.stages=build_data')
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'build_data: already done' in again.stderr


def test_every_stage_has_a_module_with_run():
  for name in common.ALL_STAGES:
    assert callable(main.stage_fn(name)), name


def test_bad_config_value_is_an_error_naming_the_field(tmp_path):
  out = run_main('--config', 'configs/tiny.py', '--workdir', str(tmp_path),
                 '--config.stages=build_data,nonsense')
  assert out.returncode != 0
  assert "main: error: config.stages='build_data,nonsense': expected a comma list" in out.stderr
  assert 'unknown: nonsense' in out.stderr


def _kill_when(cmd: list, ready, what: str, log: pathlib.Path, timeout: float = HANG_TIMEOUT,
               env=None) -> str:
  """Starts `cmd`, SIGKILLs it as soon as `ready()` holds, returns its output (kept in `log`).

  A file, not a pipe: nobody reads a pipe while waiting, and a full one would stall the run.
  """
  with open(log, 'w') as f:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + timeout
    while not ready() and proc.poll() is None and time.time() < deadline:
      time.sleep(0.05)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  out = log.read_text(errors='replace')
  assert alive, f'the run ended before it could be killed in {what}:\n{out[-3000:]}'
  return out


def _checkpoint_params(workdir: pathlib.Path) -> bytes:
  """The SDM params of the last checkpoint in `workdir`, serialised."""
  # pylint: disable=g-import-not-at-top
  from flax import serialization
  import jax
  from configs import tiny
  from diffmix_jax.core import checkpoint
  from diffmix_jax.sdm import training as sdm_training
  from diffmix_jax.core import sharding
  c = tiny.get_config()
  trainer = sdm_training.create_trainer(c, sharding.create_mesh(c.mesh))
  manager = checkpoint.create_manager(str(workdir / 'diffusion' / 'checkpoints'), 3)
  try:
    step, state, _ = checkpoint.restore_latest(
        manager, checkpoint.abstract(trainer.abstract_state, trainer.state_sharding))
  finally:
    manager.close()
  assert step == c.diffusion.train.phase1_steps + c.diffusion.train.phase2_steps
  return serialization.to_bytes(jax.device_get(state.params))


@pytest.mark.slow
@pytest.mark.e2e
def test_tiny_chain_killed_in_two_stages_resumes_to_the_reference(
    tiny_trained, sampled, tmp_path):
  """The chain of configs/tiny.py through `main` up to `sample`, SIGKILLed twice on the way.

  Starts from the built dataset of `tiny_trained`. Run 1 is killed after the first SDM checkpoint;
  run 2 resumes training (its EMA and params equal the uninterrupted in-process run of
  `tiny_trained` bit for bit), mixes labels and is killed after the second synthetic shard; run 3
  resumes sampling (every patch exactly once, shards equal `sampled`'s) and stops there. The rest
  of the chain through `main` (both HoVer-Net runs, evaluate with the synthetic fidelity, report,
  the no-op rerun) is checked on the same config by tests/e2e/conic_chain_test.py.
  """
  # pylint: disable=g-import-not-at-top
  from conftest import copy_workdir
  import numpy as np
  from configs import tiny
  from diffmix_jax.data import input_pipeline
  from diffmix_jax.stages import sample
  from diffmix_jax.data import synthetic as synthetic_io
  config = tiny.get_config()
  tc = config.diffusion.train
  assert tc.checkpoint_every_steps < tc.phase1_steps  # Killed with steps to go.
  workdir = copy_workdir(tiny_trained, tmp_path / 'chain',
                         skip=('diffusion', 'mixed_labels', 'synthetic'))
  cmd = [sys.executable, '-m', 'diffmix_jax.main', '--config', 'configs/tiny.py', '--workdir',
         str(workdir)]
  first = workdir / 'diffusion' / 'checkpoints' / str(tc.checkpoint_every_steps)
  _kill_when(cmd, first.is_dir, 'diffusion_train', tmp_path / 'run1.log')
  assert not (workdir / 'diffusion' / 'DONE').exists()
  out = _kill_when(cmd, synthetic_io.shard_path(workdir, 1).exists, 'sample',
                   tmp_path / 'run2.log')
  assert 'diffusion_train: resumed from step' in out, out[-3000:]
  name = wdir.EMA_PARAMS
  assert (workdir / 'diffusion' / name).read_bytes() == (tiny_trained / 'diffusion' /
                                                         name).read_bytes()
  assert _checkpoint_params(workdir) == _checkpoint_params(tiny_trained)
  assert not (workdir / 'synthetic' / 'DONE').exists()

  done = run_main('--config', 'configs/tiny.py', '--workdir', str(workdir),
                  f'--config.stages={UP_TO_SAMPLE}')
  assert done.returncode == 0, done.stderr[-4000:]
  assert re.search(r'sample: \d+ patches in (\d+) shards, (?!\1 )\d+ shards to render',
                   done.stderr), done.stderr[-3000:]
  tiles = {t['name']: t for t in input_pipeline.load_split(config, str(workdir), 'train')}
  items = sample.work_items(config, str(workdir), tiles)
  shards = lambda w: [synthetic_io.read_shard(w, k)
                      for k in range(len(list((w / 'synthetic' / 'shards').glob('shard_*.npz'))))]
  got, want = shards(workdir), shards(sampled)
  assert len(got) == -(-len(items) // config.sample.shard_size) > 3
  np.testing.assert_array_equal(np.concatenate([s['index'] for s in got]), np.arange(len(items)))
  for a, b in zip(got, want):  # Same seed, same images, however the run was interrupted.
    for key in synthetic_io.SHARD_KEYS:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)

  assert (workdir / 'synthetic' / 'DONE').exists()
  assert not (workdir / 'hovernet_baseline').exists()  # Stopped after `sample`.


UP_TO_SAMPLE = 'build_data,diffusion_train,mix_labels,sample'


def assert_noop_rerun(workdir: pathlib.Path, *args: str, env=None) -> None:
  """`main` again on a finished workdir of configs/tiny.py (+ `args`, the first run's flags): every
  stage says "already done" and no file is written again (`main` itself rewrites config.json and
  timings.json with the same bytes; the compilation cache is JAX's)."""
  from conftest import file_snapshot  # pylint: disable=g-import-not-at-top
  snapshot = lambda: file_snapshot(workdir, (wdir.CONFIG, wdir.TIMINGS), (wdir.COMPILATION_CACHE,))
  before = snapshot()
  again = run_main('--config', 'configs/tiny.py', '--workdir', str(workdir), *args, env=env)
  assert again.returncode == 0, again.stderr[-3000:]
  for stage in ('build_data', 'diffusion_train', 'mix_labels', 'sample', 'evaluate', 'report'):
    assert f'{stage}: already done' in again.stderr, stage
  for run in ('baseline', 'diffmix'):
    assert f'hovernet_train: run {run} already done' in again.stderr, run
  after = snapshot()
  assert sorted(after) == sorted(before)
  assert [p for p in before if before[p] != after[p]] == []


@pytest.mark.slow  # Cheap itself, but needs the trained `tiny_trained` (a minute of SDM training).
def test_a_resume_with_a_changed_width_is_one_line_naming_the_leaf(tiny_trained, tmp_path):
  """SDM checkpoints of width 32, resumed with --config.diffusion.model.num_channels=64: exit 1, one
  error line naming the step, the folder and the first differing leaf; no file touched."""
  from conftest import copy_workdir  # pylint: disable=g-import-not-at-top
  workdir = copy_workdir(tiny_trained, tmp_path / 'w', skip=('mixed_labels', 'synthetic'))
  for name in (wdir.DONE, wdir.EMA_PARAMS):  # An SDM run killed after its last checkpoint.
    (workdir / 'diffusion' / name).unlink()
  folder = workdir / 'diffusion' / 'checkpoints'
  files = lambda: {p: p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}
  before = files()
  out = run_main('--config', 'configs/tiny.py', '--workdir', str(workdir),
                 '--config.stages=diffusion_train', '--config.diffusion.model.num_channels=64')
  assert out.returncode == 1, out.stderr[-3000:]
  errors = [line for line in out.stderr.splitlines() if line.startswith('main: error:')]
  assert len(errors) == 1, out.stderr[-3000:]
  assert errors[0].startswith(
      f'main: error: diffusion_train: checkpoint step 12 in {folder} does not fit the configured '
      "model: ema/input_blocks_0_0/bias: checkpoint ((32,), 'float32'), model ((64,), 'float32')"
  ), errors[0]
  assert 'Traceback' not in out.stderr and files() == before


def _finished_checkpoint(folder: pathlib.Path) -> bool:
  """True once orbax has renamed a step folder into place (a digits-only name)."""
  return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


# Where the killed chain gets its SIGKILL: (stage, its folder, a test that it is part-way done, what
# the next run logs when it resumes that stage).
KILL_POINTS = (
    ('diffusion_train', 'diffusion', lambda d: _finished_checkpoint(d / 'checkpoints'),
     r'diffusion_train: resumed from step \d+'),
    ('sample', 'synthetic', lambda d: (d / 'shards' / 'shard_00001.npz').exists(),
     r'sample: \d+ patches in (\d+) shards, (?!\1 )\d+ shards to render'),
    ('hovernet_train', 'hovernet_baseline', lambda d: _finished_checkpoint(d / 'checkpoints'),
     r'hovernet_train: run baseline resumed from step \d+'),
)


@pytest.mark.skipif(not os.environ.get('DIFFMIX_SLOW_TESTS'),
                    reason='two whole chains (tiny: ~8 minutes on 2 cores; set DIFFMIX_SLOW_TESTS=1, '
                    'and DIFFMIX_KILL_CONFIG=configs/demo.py for the demo)')
def test_chain_killed_in_three_stages_equals_uninterrupted(tmp_path):
  """End-to-end issue, acceptance 3: SIGKILL during SDM training, sampling and HoVer-Net training;
  each rerun resumes that stage, and the final metrics equal an uninterrupted run's (same config)."""
  config = os.environ.get('DIFFMIX_KILL_CONFIG', 'configs/tiny.py')
  timeout, env = 2 * HANG_TIMEOUT, _one_device_env()
  reference = tmp_path / 'reference'
  out = run_main('--config', config, '--workdir', str(reference), timeout=timeout, env=env)
  assert out.returncode == 0, out.stderr[-4000:]
  killed = tmp_path / 'killed'
  cmd = [sys.executable, '-m', 'diffmix_jax.main', '--config', config, '--workdir', str(killed)]
  outs = []
  for stage, folder, part_done, _ in KILL_POINTS:
    outs.append(_kill_when(cmd, functools.partial(part_done, killed / folder), stage,
                           tmp_path / f'run_killed_in_{stage}.log', timeout, env))
    assert not (killed / folder / 'DONE').exists(), stage
  done = run_main('--config', config, '--workdir', str(killed), timeout=timeout, env=env)
  assert done.returncode == 0, done.stderr[-4000:]
  later = outs[1:] + [done.stderr]
  for (stage, _, _, resumed), text in zip(KILL_POINTS, later):
    assert re.search(resumed, text), f'the run after the kill in {stage} did not resume it'
  got, want = (json.loads((w / 'report' / 'metrics.json').read_text()) for w in (killed, reference))
  for run in ('baseline', 'diffmix'):
    assert got[run] == want[run], run
