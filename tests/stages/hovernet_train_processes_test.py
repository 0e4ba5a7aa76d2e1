"""`hovernet_train` in two processes (one simulated CPU device each, over 127.0.0.1, validating
every epoch) equals the run of one process with both devices.

Each run is `hovernet_train.train_run` on one demo train tile (4 windows at step 164, global batch
2: 2 steps per epoch, 2 epochs of phase 2) and three demo test tiles for validation, so one
process predicts two tiles and the other one: process 0 gathers the other's records through the
run folder. Compared: the logged training scalars step by step to 1e-5 (the tolerance of the
multi-process `main` test), the validation metrics of both epochs, and the final weights (all
bit-identical when measured). Phase 1 does not run, so a phase-1 batch of 8, more than the 4
windows, is no error.
"""

import os
import pathlib
import subprocess
import sys

from flax import serialization
import jax
import numpy as np
import pytest

from conftest import finish_processes
from conftest import HANG_TIMEOUT
from conftest import xla_flags
from conftest import free_port
from conftest import tensorboard_scalars
from hovernet_train_test import _tiny_config
from tfds_builders.demo_nuclei import generate as demo_tiles

ROOT = pathlib.Path(__file__).resolve().parents[2]
RUN = 'hovernet_baseline'
VAL = ('val_dice', 'val_aji', 'val_pq', 'val_f_d', 'val_acc')


def setup():
  """(config, train tiles, validation tiles) of every run: hovernet_train_test's tiny HoVer-Net,
  phase 2 only, scalars every step, validation every epoch."""
  c = _tiny_config(phase1_epochs=0, phase2_epochs=2, phase1_batch_size=8, log_every_steps=1,
                   val_every_epochs=1, loader_threads=1)
  tile = lambda split, i: dict(zip(('image', 'inst_map', 'type_map'),
                                   demo_tiles.make_tile(0, split, i)), name=f'{split}_{i}')
  return c, [tile('train', 0)], [tile('test', i) for i in range(3)]


WORKER = """
import sys
import jax
if sys.argv[1]:
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                             process_id=int(sys.argv[2]), initialization_timeout=120)
sys.path[:0] = [sys.argv[4], sys.argv[5]]
import hovernet_train_processes_test as t
from diffmix_jax.stages import hovernet_train
config, tiles, val_tiles = t.setup()
hovernet_train.train_run(config, sys.argv[3], 'baseline', 0, tiles=tiles, val_tiles=val_tiles)
"""


def _start(workdir: pathlib.Path, devices: int, address: str = '', process: int = 0):
  """One worker; its output goes to `<workdir>.<process>.log` (`conftest.finish_processes`)."""
  env = dict(os.environ, XLA_FLAGS=xla_flags(devices),
             PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu')
  paths = [str(pathlib.Path(__file__).parent), str(ROOT / 'tests')]  # This module, conftest.
  log = pathlib.Path(f'{workdir}.{process}.log')
  with open(log, 'w') as f:
    proc = subprocess.Popen([sys.executable, '-c', WORKER, address, str(process), str(workdir),
                             *paths], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
  proc.log = log
  return proc


@pytest.mark.slow
@pytest.mark.e2e
def test_two_processes_train_and_validate_as_one(tmp_path):
  one, two = tmp_path / 'one', tmp_path / 'two'
  address = f'127.0.0.1:{free_port()}'
  procs = [_start(one, 2)] + [_start(two, 1, address, i) for i in range(2)]
  results = finish_processes(procs, HANG_TIMEOUT)
  assert [rc for rc, _ in results] == [0, 0, 0], '\n\n'.join(log[-3000:] for _, log in results)
  want, got = tensorboard_scalars(one / RUN / 'tb'), tensorboard_scalars(two / RUN / 'tb')
  for tag in ('loss', 'np_ce', 'np_dice', 'hv_mse', 'hv_msge', 'tp_ce', 'tp_dice'):
    assert sorted(want[tag]) == sorted(got[tag]) == [1, 2, 3, 4], tag
    np.testing.assert_allclose([got[tag][s] for s in range(1, 5)],
                               [want[tag][s] for s in range(1, 5)], atol=1e-5, rtol=0, err_msg=tag)
  for tag in VAL:  # Both epochs validated; process 0 scored the tile process 1 predicted.
    assert sorted(want[tag]) == sorted(got[tag]) == [2, 4], tag
    np.testing.assert_allclose([got[tag][s] for s in (2, 4)], [want[tag][s] for s in (2, 4)],
                               atol=1e-6, rtol=0, err_msg=tag)
  assert want['val_dice'][4] > 0  # The network found nuclei: the metrics are not all zero.
  assert sorted(p.name for p in (two / RUN / 'validation').iterdir()) == ['00001.mat']
  assert not (one / RUN / 'validation').exists()
  read = lambda d: serialization.msgpack_restore((d / RUN / 'variables.msgpack').read_bytes())
  for a, b in zip(*(jax.tree.leaves(read(d)) for d in (one, two))):
    np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)
  assert (two / RUN / 'DONE').exists()

