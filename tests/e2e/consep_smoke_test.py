"""The whole chain on real CoNSeP at smoke scale, through the real `main`.

`configs/consep_smoke.py` on $DIFFMIX_CONSEP_DIR (merged labels): every stage, then the same command
again (a no-op). The checks are the paper's geometry on real data: 256-px synthetic patches at the
official grid's offsets with their mixed labels, 49 HoVer-Net windows of 540 px per 1000^2 train
tile, predictions covering each 1000^2 test tile exactly, a report whose metrics are the saved
predictions' scores, for every class. Skipped without the data.

One HoVer-Net run, `diffmix` (real windows and synthetic rows): the baseline runs the same code on
the real windows alone, and the CoNIC-layout chain (tests/e2e/conic_chain_test.py) trains and scores
both arms and the synthetic fidelity; here a second run would cost a third of the chain. XLA
compiles at its default optimisation: the chain runs its programs on 256-1000 px inputs, where the
faster code outweighs the longer compiles (measured per stage, 2-core CPU, 2026-12-06: 305 CPU-s
against 339 at level 0).
"""

import json
import os
import pathlib

import numpy as np
import pytest
from scipy import io as sio

from configs import consep_smoke
from conftest import rescore_from_files
from conftest import xla_flags
from diffmix_jax.hovernet import targets as hovernet_targets
from diffmix_jax.mixing import files as mixed_files
from diffmix_jax.data import synthetic as synthetic_io
from diffmix_jax.mixing import tiles as mixing_tiles
from main_test import _one_device_env
from main_test import run_main

CONSEP = os.environ.get('DIFFMIX_CONSEP_DIR', '')
pytestmark = [
    pytest.mark.slow, pytest.mark.e2e, pytest.mark.xdist_group('consep_smoke'),
    pytest.mark.skipif(not CONSEP, reason='set DIFFMIX_CONSEP_DIR to a CoNSeP copy with merged '
                       'labels (../shared/data/consep) to run the real-data smoke chain')]
TILE = 1000  # CoNSeP tiles are 1000 x 1000.


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('consep_smoke') / 'w'
  args = ('--config', 'configs/consep_smoke.py', '--workdir', str(workdir),
          '--config.hovernet.train.runs=diffmix')
  env = dict(_one_device_env(), DIFFMIX_CONSEP_DIR=CONSEP, XLA_FLAGS=xla_flags(optimize=True))
  first = run_main(*args, env=env)
  again = run_main(*args, env=env)
  return {'workdir': workdir, 'first': first, 'again': again}


def _finished(smoke) -> pathlib.Path:
  first = smoke['first']
  assert first.returncode == 0, first.stderr[-4000:]
  return smoke['workdir']


def test_every_stage_runs_then_the_same_command_is_a_noop(smoke):
  _finished(smoke)
  again = smoke['again']
  assert again.returncode == 0, again.stderr[-3000:]
  for done in ('build_data:', 'diffusion_train:', 'mix_labels:', 'sample:',
               'hovernet_train: run diffmix', 'evaluate:', 'report:'):
    assert f'{done} already done' in again.stderr, (done, again.stderr[-3000:])


def test_build_counts_every_real_tile_and_nucleus(smoke):
  """The whole folder is built (subsets apply when tiles are read): per-class counts as in
  ../shared/data/README.md."""
  summary = json.loads((_finished(smoke) / 'build_data' / 'summary.json').read_text())
  train, test = summary['splits']['train'], summary['splits']['test']
  assert train['tiles'] == 27 and test['tiles'] == 14
  assert train['nuclei_per_class'] == {'1': 371, '2': 3941, '3': 5537, '4': 5706}
  assert test['nuclei_per_class'] == {'1': 561, '2': 1638, '3': 3214, '4': 3364}


def test_synthetic_patches_sit_on_the_official_grid_with_their_mixed_labels(smoke):
  workdir = _finished(smoke)
  config = consep_smoke.get_config()
  size = config.sample.patch_size
  grid = mixing_tiles.grid_offsets(TILE, TILE, size, config.sample.grid_stride)
  assert np.all(grid % 76 == 0) and len(grid) == 4  # Points of the official stride-76 grid.
  count = len(list((workdir / 'synthetic' / 'shards').glob('shard_*.npz')))
  shards = [synthetic_io.read_shard(workdir, k) for k in range(count)]
  items = {(str(kd), str(t), int(p)): (o, im, it, ty) for s in shards for kd, t, p, o, im, it, ty
           in zip(s['kind'], s['tile'], s['patch'], s['offset'], s['image'], s['inst_map'],
                  s['type_map'])}
  assert len(items) == 2 * len(grid)  # Both kinds, every patch of the one train tile, once.
  for (kind, tile, p), (offset, image, inst, types) in items.items():
    assert tile == 'train_24' and image.shape == (size, size, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(offset, grid[p])
    mixed = mixed_files.load_mixed(workdir, kind, tile)
    if kind == 'balance':
      r, c = offset
      want_types = mixed['type_map'][r:r + size, c:c + size]
      want_inst = mixed['inst_map'][r:r + size, c:c + size]
    else:
      np.testing.assert_array_equal(mixed['offsets'][p], offset)
      want_types, want_inst = mixed['type_maps'][p], mixed['inst_maps'][p]
    np.testing.assert_array_equal(types, want_types)
    np.testing.assert_array_equal(inst > 0, want_inst > 0)
    assert len(np.unique(inst)) == len(np.unique(want_inst))  # Renumbered, none lost.


def test_hovernet_trains_on_540px_mirror_windows(smoke):
  workdir = _finished(smoke)
  config = consep_smoke.get_config()
  h = config.hovernet.train
  padded = TILE + 2 * ((h.patch_window - h.patch_step) // 2)
  windows = hovernet_targets.patch_offsets((padded, padded), h.patch_window, h.patch_step)
  assert (h.patch_window, len(windows)) == (540, 49)
  done = json.loads((workdir / 'hovernet_diffmix' / 'DONE').read_text())
  assert done['real_windows'] == 49 and done['steps'] == 7, done
  # The 8 synthetic 256-px patches packed into two 512-px mosaics of 2 x 2, each cut as a tile is:
  # 4 x 4 windows of 540 px; 2 rows per step beside the 7 real (synthetic_ratio 2/7).
  assert done['synthetic_items'] == 2 * 16 and done['synthetic_per_batch'] == [0, 2], done
  assert not (workdir / 'hovernet_baseline').exists()  # The one run asked for.


def test_predictions_cover_each_1000px_test_tile(smoke):
  workdir = _finished(smoke)
  preds = sorted((workdir / 'eval' / 'diffmix' / 'pred').glob('*.mat'))
  assert [p.stem for p in preds] == ['test_4']
  mat = sio.loadmat(preds[0])
  assert mat['inst_map'].shape == (TILE, TILE)
  assert len(mat['inst_type']) == len(mat['inst_uid']) == len(mat['inst_centroid'])


def test_report_scores_the_saved_predictions_for_every_class(smoke):
  workdir = _finished(smoke)
  metrics = json.loads((workdir / 'report' / 'metrics.json').read_text())
  assert metrics['tiles'] == {'train': 'train_24', 'test': 'test_4'}
  m, want = metrics['diffmix'], rescore_from_files(workdir / 'eval' / 'diffmix')
  assert m['num_true'] == want['num_true'] == 50 + 5 + 304 + 59  # test_4's nuclei.
  assert m['dice'] == pytest.approx(want['dice'], abs=1e-12)
  assert (m['num_images'], m['num_pred']) == (1, want['num_pred'])
  assert sorted(m['f_c']) == ['1', '2', '3', '4'], m['f_c']
  # The untrained-looking network (official init, 7 steps) still finds nuclei: real
  # post-processing ran on a non-empty prediction.
  assert want['num_pred'] > 0
  assert 'baseline' not in metrics and 'synthetic_fidelity' not in metrics  # Needs a baseline.
  assert 'Tiles: train train_24; test test_4.' in (workdir / 'report' / 'report.md').read_text()
