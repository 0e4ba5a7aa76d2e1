"""The accelerator bench (bench/accelerator.py): its CPU smoke run writes every part, and its import
path holds no TensorFlow, TFDS or grain (the lent GPU's image has none of them)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from conftest import HANG_TIMEOUT
from conftest import xla_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Runs the bench with tensorflow, tensorflow_datasets and grain unimportable; every attempt to
# import one is printed, so a `try: import ...` elsewhere cannot hide it.
_BLOCKED_RUN = r'''
import importlib.abc, runpy, sys
class Block(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path, target=None):
    if name.split('.')[0] in ('tensorflow', 'tensorflow_datasets', 'grain'):
      print('BLOCKED ' + name, flush=True)
      raise ImportError('blocked for this test: ' + name)
sys.meta_path.insert(0, Block())
sys.argv = ['bench/accelerator.py', '--smoke', '--out', sys.argv[1]]
runpy.run_path('bench/accelerator.py', run_name='__main__')
'''


@pytest.mark.slow
@pytest.mark.e2e
def test_accelerator_smoke_writes_every_part_without_tf_tfds_or_grain(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=xla_flags())
  # The suite's persistent compilation cache goes through etils.epath, which probes for
  # TensorFlow's gfile on its own; the bench sets no cache, so neither does this run.
  env.pop('JAX_COMPILATION_CACHE_DIR', None)
  res = subprocess.run([sys.executable, '-c', _BLOCKED_RUN, str(tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=HANG_TIMEOUT)
  assert res.returncode == 0, res.stderr[-3000:]
  assert 'BLOCKED' not in res.stdout, res.stdout
  result = json.loads((tmp_path / 'accelerator.json').read_text())
  md = (tmp_path / 'accelerator.md').read_text()
  assert result['smoke'] is True and result['environment']['platform'] == 'cpu'
  assert set(result['environment']) >= {'date_utc', 'device_kind', 'device_count', 'jax', 'jaxlib'}
  assert list(result['parts']) == ['sdm_train', 'synthesis', 'hovernet', 'scaling', 'wsi']
  wsi = result['parts']['wsi']  # Whole-slide predict of a one-tile slide, tiny network.
  assert wsi['status'] == 'ok' and wsi['figures']['windows'] == 4 and wsi['figures']['nuclei'] > 0, wsi
  for name, part in result['parts'].items():
    assert part['status'] in ('ok', 'skipped', 'failed') and part['command'], name
    assert f'| {name} | {part["status"]} |' in md
  # On one CPU device every measured part runs; scaling has nothing to scale over.
  sdm = result['parts']['sdm_train']
  assert sdm['status'] == 'ok', sdm
  for remat in ('remat_True', 'remat_False'):
    figures = sdm['figures'][remat]
    assert figures['img_per_s'] > 0 and figures['flops_per_step'] > 0, figures
    assert set(figures['mfu']) == {'measured', 'datasheet'}
  synthesis = result['parts']['synthesis']
  assert synthesis['status'] == 'ok' and synthesis['figures']['patches_per_s'] > 0, synthesis
  hovernet = result['parts']['hovernet']['figures']['fast']
  assert hovernet['train_phase2']['img_per_s'] > 0 and hovernet['inference']['tile_s'] > 0
  assert result['parts']['scaling']['status'] == 'skipped'
  assert result['parts']['scaling']['reason'] == 'one device: nothing to scale over'
