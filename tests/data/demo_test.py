"""Tests of the demo set's export to the CoNSeP layout."""

import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
from scipy import io as sio


from tfds_builders.demo_nuclei import generate as demo_tiles
from diffmix_jax.metrics import records


def test_export_writes_consep_layout_that_scores_one_against_itself(tmp_path):
  out = tmp_path / 'tiles'
  run = subprocess.run([sys.executable, '-m', 'diffmix_jax.data.demo', '--export', str(out)],
                       capture_output=True, text=True, check=True)
  assert 'wrote 8 tiles' in run.stdout
  names = sorted(p.stem for p in (out / 'Images').glob('*.png'))
  assert names == sorted(f'test_{k}' for k in range(1, 9))
  image, inst, types = demo_tiles.make_tile(demo_tiles.SEED, 'test', 2)
  np.testing.assert_array_equal(np.asarray(Image.open(out / 'Images' / 'test_3.png')), image)
  mat = sio.loadmat(out / 'Labels' / 'test_3.mat')
  np.testing.assert_array_equal(mat['inst_map'], inst)
  np.testing.assert_array_equal(mat['type_map'], types)
  n = int(inst.max())
  assert mat['inst_type'].shape == (n, 1) and mat['inst_centroid'].shape == (n, 2)
  for i in (1, n // 2, n):  # Type = the nucleus's class; centroid = its centre of mass as (x, y).
    ys, xs = np.nonzero(inst == i)
    assert mat['inst_type'][i - 1, 0] == np.bincount(types[inst == i]).argmax()
    np.testing.assert_allclose(mat['inst_centroid'][i - 1], [xs.mean(), ys.mean()])
  result = records.evaluate_dirs(out / 'Labels', out / 'Labels')
  assert result['num_true'] == result['num_pred'] == 456
  assert result['dice'] == pytest.approx(1.0) and result['pq'] == pytest.approx(1.0)
  assert result['f_c'] == pytest.approx({str(c): 1.0 for c in range(1, 5)})
  assert not list(out.rglob('*.tmp*'))  # Atomic writes leave no temp files.
