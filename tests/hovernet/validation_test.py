"""Validation during HoVer-Net training: two processes (each predicting its share, process 0
scoring all) equal one; the inference step compiles once however often validation runs."""

import json
import os
import pathlib
import socket
import subprocess
import sys

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from tfds_builders.demo_nuclei import generate as demo_tiles
from diffmix_jax.hovernet import infer as hovernet_infer
from diffmix_jax.hovernet import validation as hovernet_validation
from diffmix_jax.hovernet import model as hovernet

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL = dict(mode='fast', nr_types=5, width=16, encoder_units=(1, 1, 1, 1), decoder_units=(1, 1))


def setup():
  """(module, variables, 3 demo test tiles, config.eval): random weights whose NP head is biased
  to nuclei, so the post-processing finds instances and the metrics are not all zero."""
  module = hovernet.HoVerNet(**MODEL)
  v = jax.device_get(module.init(jax.random.key(3), jnp.zeros((1, 256, 256, 3))))
  flat = traverse_util.flatten_dict(v['params'])
  flat[('decoder', 'np', 'u0', 'conv', 'bias')] = np.array([-1.0, 1.0], np.float32)
  variables = {'params': traverse_util.unflatten_dict(flat), 'batch_stats': v['batch_stats']}
  tiles = []
  for i in range(3):
    image, inst, types = demo_tiles.make_tile(0, 'test', i)
    tiles.append({'name': f'test_{i}', 'image': image, 'inst_map': inst, 'type_map': types})
  return module, variables, tiles, tiny.get_config().eval


WORKER = """
import sys, json, hashlib
import jax
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                           process_id=int(sys.argv[2]), initialization_timeout=120)
sys.path.insert(0, sys.argv[4])
import validation_test as t
from diffmix_jax.hovernet import validation as hovernet_validation
module, variables, tiles, eval_config = t.setup()
result = hovernet_validation.validate(module, variables, tiles, 1, eval_config, sys.argv[3], 1)
if jax.process_index() == 0:
  scalars, picture = result
  print('RESULT', json.dumps({'scalars': scalars,
                              'overlay': hashlib.sha256(picture.tobytes()).hexdigest()}))
else:
  assert result is None
  print('RESULT none')
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.e2e
def test_two_processes_validate_as_one(tmp_path):
  import hashlib  # pylint: disable=g-import-not-at-top
  module, variables, tiles, eval_config = setup()
  one, picture = hovernet_validation.validate(module, variables, tiles, 8, eval_config, tmp_path)
  assert one['val_dice'] > 0 and picture.shape == (256, 3 * 256, 3)
  # Compiled once: a second validation (the next epoch) reuses the jitted step.
  hovernet_validation.validate(module, variables, tiles, 8, eval_config, tmp_path)
  assert hovernet_infer._jitted_infer_step(  # pylint: disable=protected-access
      module, hovernet_infer.local_mesh())._cache_size() == 1
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1',
             PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu')
  address = f'127.0.0.1:{_free_port()}'
  procs = [subprocess.Popen([sys.executable, '-c', WORKER, address, str(i), str(tmp_path / 'val'),
                             str(ROOT / 'tests' / 'hovernet')], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = [p.communicate(timeout=600)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], '\n'.join(log[-3000:] for log in logs)
  got = json.loads(logs[0].split('RESULT ', 1)[1].splitlines()[0])
  assert 'RESULT none' in logs[1]
  # Process 1 predicted tile 1 and left it for process 0; the metrics equal one process's.
  assert sorted(p.name for p in (tmp_path / 'val').iterdir()) == ['00001.mat']
  for k, v in one.items():
    assert abs(got['scalars'][k] - v) < 1e-6, (k, got['scalars'][k], v)
  assert got['overlay'] == hashlib.sha256(picture.tobytes()).hexdigest()
