"""Tests of diffmix_jax.evaluate: .mat loading and validation, folder matching, JSON, the CLI, real data."""

import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from scipy import io as sio

from conftest import HANG_TIMEOUT
from diffmix_jax.metrics import records

ROOT = pathlib.Path(__file__).resolve().parents[2]
SQ1 = 1 / (1 + 1e-6)  # SQ of a perfect image (the official epsilon).


def boxes(shape, spec) -> np.ndarray:
  out = np.zeros(shape, np.int32)
  for i, (r0, r1, c0, c1) in spec.items():
    out[r0:r1, c0:c1] = i
  return out


def record(inst_map, types, **extra) -> dict:
  """A CoNSeP-style record: rows follow the ascending ids; centroids are (x, y) centres of mass."""
  ids = [i for i in np.unique(inst_map) if i]
  cents = [np.nonzero(inst_map == i)[::-1] for i in ids]
  return dict(inst_map=inst_map, inst_type=np.array(types, np.int32).reshape(-1, 1),
              inst_centroid=np.array([[c[0].mean(), c[1].mean()] for c in cents]).reshape(-1, 2),
              **extra)


def hand_case() -> dict[str, tuple[dict, dict]]:
  """Two images with known metrics (see test_evaluate_dirs_hand_case)."""
  shape = (16, 16)
  true_a = record(boxes(shape, {1: (0, 3, 0, 3), 2: (0, 3, 10, 13)}), [1, 2])
  pred_a = record(boxes(shape, {5: (0, 3, 0, 3)}), [2])
  true_b = record(boxes(shape, {1: (6, 11, 2, 7)}), [3])
  pred_b = record(boxes(shape, {9: (6, 11, 2, 7)}), [3])
  return {'img_a': (true_a, pred_a), 'img_b': (true_b, pred_b)}


def write_dirs(tmp_path, case) -> tuple[pathlib.Path, pathlib.Path]:
  true_dir, pred_dir = tmp_path / 'true', tmp_path / 'pred'
  true_dir.mkdir()
  pred_dir.mkdir()
  for name, (true, pred) in case.items():
    sio.savemat(true_dir / f'{name}.mat', true)
    sio.savemat(pred_dir / f'{name}.mat', pred)
  return true_dir, pred_dir


def expected_hand_metrics() -> dict:
  # img_a: g1 found exactly, g2 missed -> Dice 18/27, AJI = AJI+ = 9/18, DQ 1/1.5. img_b: perfect.
  return {
      'dice': (2 / 3 + 1) / 2, 'aji': 0.75, 'aji_plus': 0.75, 'dq': (2 / 3 + 1) / 2, 'sq': SQ1,
      'pq': (2 / 3 + 1) / 2 * SQ1,
      # Pairs (types): (1, 2) and (3, 3); the type-2 nucleus is missed.
      'f_d': 2 * 2 / (2 * 2 + 0 + 1), 'acc': 0.5, 'f_c': {'1': 0.0, '2': 0.0, '3': 1.0},
      'num_images': 2, 'num_true': 3, 'num_pred': 2,
  }


def test_evaluate_dirs_hand_case(tmp_path):
  true_dir, pred_dir = write_dirs(tmp_path, hand_case())
  metrics = records.evaluate_dirs(true_dir, pred_dir)
  expected = expected_hand_metrics()
  assert metrics.pop('f_c') == pytest.approx(expected.pop('f_c'), abs=1e-12)
  assert {k: metrics[k] for k in expected} == pytest.approx(expected, abs=1e-12)
  assert list(metrics['per_image']) == ['img_a', 'img_b']
  assert metrics['per_image']['img_a'] == pytest.approx(
      dict(dice=2 / 3, aji=0.5, aji_plus=0.5, dq=2 / 3, sq=SQ1, pq=2 / 3 * SQ1), abs=1e-12)
  # The same from in-memory records.
  case = hand_case()
  in_memory = records.evaluate_arrays(list(case.values()), names=list(case))
  assert in_memory.pop('f_c') == {'1': 0.0, '2': 0.0, '3': 1.0}
  assert in_memory == metrics


def test_cli_writes_json_atomically_and_prints_a_table(tmp_path):
  true_dir, pred_dir = write_dirs(tmp_path, hand_case())
  out = tmp_path / 'out' / 'metrics.json'
  proc = subprocess.run(
      [sys.executable, '-m', 'diffmix_jax.evaluate', f'--true_dir={true_dir}',
       f'--pred_dir={pred_dir}', f'--out={out}'],
      cwd=ROOT, capture_output=True, text=True, timeout=HANG_TIMEOUT, check=False)
  assert proc.returncode == 0, proc.stderr
  assert 'AJI+' in proc.stdout and 'img_b' in proc.stdout and 'F_d 0.8000' in proc.stdout
  metrics = json.loads(out.read_text())
  assert metrics == records.evaluate_dirs(true_dir, pred_dir)  # Exact through JSON.
  assert sorted(metrics) == sorted(['dice', 'aji', 'aji_plus', 'dq', 'sq', 'pq', 'per_image', 'f_d',
                                    'acc', 'f_c', 'mpq_plus', 'pq_per_class', 'num_images',
                                    'num_true', 'num_pred'])
  assert [p.name for p in out.parent.iterdir()] == ['metrics.json']  # No temporary file left.
  (pred_dir / 'img_b.mat').unlink()
  proc = subprocess.run(
      [sys.executable, '-m', 'diffmix_jax.evaluate', f'--true_dir={true_dir}',
       f'--pred_dir={pred_dir}', f'--out={out}'],
      cwd=ROOT, capture_output=True, text=True, timeout=HANG_TIMEOUT, check=False)
  assert proc.returncode == 2 and 'img_b.mat' in proc.stderr


def test_write_json_replaces_an_existing_file(tmp_path):
  out = tmp_path / 'm.json'
  out.write_text('old')
  records.write_json({'a': 1.5}, out)
  assert json.loads(out.read_text()) == {'a': 1.5}
  assert [p.name for p in tmp_path.iterdir()] == ['m.json']


def test_missing_or_extra_file_is_an_error_naming_it(tmp_path):
  true_dir, pred_dir = write_dirs(tmp_path, hand_case())
  (pred_dir / 'img_b.mat').rename(tmp_path / 'img_b.mat')
  with pytest.raises(ValueError, match='img_b.mat'):
    records.evaluate_dirs(true_dir, pred_dir)
  shutil.copy(tmp_path / 'img_b.mat', pred_dir / 'img_b.mat')
  shutil.copy(tmp_path / 'img_b.mat', pred_dir / 'img_c.mat')
  with pytest.raises(ValueError, match='img_c.mat'):
    records.evaluate_dirs(true_dir, pred_dir)


def _bad_no_inst_map(r):
  del r['inst_map']


def _bad_type_count(r):
  r['inst_type'] = np.ones((3, 1), np.int32)


def _bad_nan_centroid(r):
  r['inst_centroid'] = np.array([[np.nan, 1.0]])


def _bad_centroid_shape(r):
  r['inst_centroid'] = np.ones((1, 3))


def _bad_shape(r):
  r['inst_map'] = np.zeros((16, 15), np.int32)
  r['inst_map'][0:3, 0:3] = 5


def _bad_uid(r):
  r['inst_uid'] = np.array([[6]], np.int32)


@pytest.mark.parametrize('corrupt, match', [
    (_bad_no_inst_map, "no 'inst_map'"),
    (_bad_type_count, 'inst_type has 3 rows'),
    (_bad_nan_centroid, 'NaN'),
    (_bad_centroid_shape, r'\[N, 2\]'),
    (_bad_shape, 'shape'),
    (_bad_uid, 'inst_uid'),
])
def test_bad_prediction_file_is_a_clear_error_naming_it(tmp_path, corrupt, match):
  case = hand_case()
  corrupt(case['img_a'][1])
  true_dir, pred_dir = write_dirs(tmp_path, case)
  with pytest.raises(ValueError, match=match) as err:
    records.evaluate_dirs(true_dir, pred_dir)
  assert str(pred_dir / 'img_a.mat') in str(err.value)


def test_load_mat_accepts_float_arrays_uid_and_empty_images(tmp_path):
  path = tmp_path / 'x.mat'
  inst_map = boxes((8, 8), {2: (0, 3, 0, 3), 7: (4, 8, 4, 8), 9: (0, 1, 6, 8)})
  # Official tile output: 9 (a thin line) is in the map but not listed in inst_uid / inst_type.
  sio.savemat(path, dict(inst_map=inst_map.astype(np.float64), inst_uid=np.array([[2], [7]]),
                         inst_type=np.array([[1.0], [4.0]]), inst_centroid=[[1, 1], [5.5, 5.5]]))
  rec = records.load_mat(path)
  assert rec['inst_map'].dtype == np.int32 and rec['inst_map'].max() == 9
  np.testing.assert_array_equal(rec['inst_type'], [1, 4])
  assert rec['inst_centroid'].shape == (2, 2) and rec['inst_uid'].tolist() == [2, 7]
  records.save_mat(path, dict(inst_map=np.zeros((4, 4), np.int32), inst_type=np.zeros(0),
                               inst_centroid=np.zeros((0, 2))))
  rec = records.load_mat(path)
  assert rec['inst_type'].shape == (0,) and rec['inst_centroid'].shape == (0, 2)
  (tmp_path / 'junk.mat').write_text('not a mat file')
  with pytest.raises(ValueError, match='junk.mat'):
    records.load_mat(tmp_path / 'junk.mat')


def test_empty_prediction_image_uses_documented_values(tmp_path):
  case = hand_case()
  empty = dict(inst_map=np.zeros((16, 16), np.int32), inst_type=np.zeros((0, 1), np.int32),
               inst_centroid=np.zeros((0, 2)))
  case['img_a'] = (case['img_a'][0], empty)
  metrics = records.evaluate_dirs(*write_dirs(tmp_path, case))
  assert metrics['per_image']['img_a'] == dict.fromkeys(records.INSTANCE_KEYS, 0.0)
  assert metrics['aji'] == pytest.approx(0.5) and metrics['num_pred'] == 1


def test_consep_test_tiles_against_themselves_score_one(consep_dir, tmp_path):
  true_dir = consep_dir / 'Test' / 'Labels'
  files = sorted(true_dir.glob('*.mat'))
  assert len(files) == 14
  pred_dir = tmp_path / 'pred'
  pred_dir.mkdir()
  for f in files:
    shutil.copy(f, pred_dir / f.name)
  metrics = records.evaluate_dirs(true_dir, pred_dir)
  assert metrics['num_images'] == 14 and metrics['num_true'] == metrics['num_pred'] == 8777
  for key in ('dice', 'aji', 'aji_plus', 'dq', 'sq', 'pq', 'f_d', 'acc'):
    assert metrics[key] == pytest.approx(1.0, abs=1e-6), key
  assert metrics['f_c'] == {'1': 1.0, '2': 1.0, '3': 1.0, '4': 1.0}
  # CoNIC's mPQ+ of the real tiles against themselves: every class, every pair of IoU 1.
  assert metrics['mpq_plus'] == pytest.approx(1.0, abs=1e-5)
  assert set(metrics['pq_per_class']) == {'1', '2', '3', '4'}
  for name, per in metrics['per_image'].items():
    assert per == pytest.approx(dict.fromkeys(records.INSTANCE_KEYS, 1.0), abs=1e-6), name
