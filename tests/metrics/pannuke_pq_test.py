"""Tests of diffmix_jax.metrics.pannuke_pq and of the `pannuke` key of records.evaluate_dirs."""

import json
import math

import numpy as np
import pytest
from scipy import io as sio

from diffmix_jax.metrics import pannuke_pq
from diffmix_jax.metrics import records
from diffmix_jax.metrics import seg_metrics
from diffmix_jax.stages import evaluate

EPS = pannuke_pq.SQ_EPS  # SQ = sum IoU / (TP + 1e-6), as the official get_fast_pq.
SHAPE = (10, 10)


def boxes(spec) -> tuple[np.ndarray, dict[int, int]]:
  """Instance map of SHAPE with {id: (r0, r1, c0, c1, class)} boxes, and {id: class}."""
  inst = np.zeros(SHAPE, np.int32)
  for i, (r0, r1, c0, c1, _) in spec.items():
    inst[r0:r1, c0:c1] = i
  return inst, {i: s[4] for i, s in spec.items()}


def hand_images() -> dict[str, tuple[str, tuple]]:
  """{name: (tissue, (true map, {id: class}, pred map, {id: class}))}; values in the tests below.

  a (Breast): true 1 (class 1, 4x4 = 16 px), true 2 (class 2, 2x2); pred 5 (class 1) on 4x3 of true 1
    (IoU 12/16 = 0.75), pred 6 (class 1) exactly on true 2 (IoU 1), pred 7 (class 3) on background.
    bPQ: TP 2, FP 1 (pred 7), FN 0 -> DQ 2/2.5 = 0.8, SQ 1.75/(2 + eps).
    Class 1: TP 1 (0.75), FP 1 (pred 6), FN 0 -> 1/1.5 * 0.75/(1 + eps) = 0.5/(1 + eps).
    Class 2: TP 0, FN 1 (true 2 was predicted as class 1) -> 0.
    Class 3: absent from the truth -> left out; pred 7 is no class-3 FP anywhere.
    mPQ_a = (0.5/(1 + eps) + 0)/2 = 0.25/(1 + eps).
  b (Breast): empty truth, one predicted nucleus -> bPQ and mPQ left out.
  c (Colon): true 1 (class 2, 4x4), true 2 (class 4, 5x5 = 25 px); pred 3 (class 2) on 4x2 of true 1
    (IoU 8/16 = 0.5: no pair, IoU must exceed 0.5), pred 4 (class 4) on 5x4 of true 2 (IoU 0.8).
    bPQ: TP 1, FP 1, FN 1 -> DQ 0.5, SQ 0.8/(1 + eps) -> 0.4/(1 + eps).
    Class 2: TP 0, FP 1, FN 1 -> 0. Class 4: 0.8/(1 + eps). mPQ_c = 0.4/(1 + eps).
  e (Colon): one type-0 (unclassified) nucleus found exactly -> bPQ 1/(1 + eps), mPQ left out.
  d (Kidney): empty truth and prediction -> everything left out; the tissue's values are None.
  """
  a = (*boxes({1: (0, 4, 0, 4, 1), 2: (6, 8, 6, 8, 2)}),
       *boxes({5: (0, 4, 0, 3, 1), 6: (6, 8, 6, 8, 1), 7: (0, 2, 8, 10, 3)}))
  b = (*boxes({}), *boxes({3: (2, 5, 2, 5, 1)}))
  c = (*boxes({1: (0, 4, 0, 4, 2), 2: (5, 10, 5, 10, 4)}),
       *boxes({3: (0, 4, 0, 2, 2), 4: (5, 10, 5, 9, 4)}))
  e = (*boxes({1: (0, 2, 0, 2, 0)}), *boxes({9: (0, 2, 0, 2, 0)}))
  d = (*boxes({}), *boxes({}))
  return {'a': ('Breast', a), 'b': ('Breast', b), 'c': ('Colon', c), 'e': ('Colon', e),
          'd': ('Kidney', d)}


EXPECTED = {
    'mpq': (0.25 / (1 + EPS) + 0.4 / (1 + EPS)) / 2,  # Breast (a only), Colon (c only); not Kidney.
    'bpq': (0.8 * 1.75 / (2 + EPS) + (0.4 + 1.0) / 2 / (1 + EPS)) / 2,  # Breast (a), Colon (c, e).
    'per_tissue': {
        'Breast': {'mpq': 0.25 / (1 + EPS), 'bpq': 0.8 * 1.75 / (2 + EPS), 'images': 2},
        'Colon': {'mpq': 0.4 / (1 + EPS), 'bpq': 0.7 / (1 + EPS), 'images': 2},
        'Kidney': {'mpq': None, 'bpq': None, 'images': 1},
    },
}


def check_expected(got: dict) -> None:
  assert list(got['per_tissue']) == ['Breast', 'Colon', 'Kidney']
  assert got['per_tissue']['Kidney'] == EXPECTED['per_tissue']['Kidney']
  for t in ('Breast', 'Colon'):
    assert got['per_tissue'][t] == pytest.approx(EXPECTED['per_tissue'][t], abs=1e-12)
  assert (got['mpq'], got['bpq']) == pytest.approx((EXPECTED['mpq'], EXPECTED['bpq']), abs=1e-12)


def test_image_pq_hand_cases():
  images = {name: image for name, (_, image) in hand_images().items()}
  mpq, bpq, per_class = pannuke_pq.image_pq(*images['a'])
  assert bpq == pytest.approx(0.8 * 1.75 / (2 + EPS), abs=1e-12)
  assert per_class == pytest.approx({1: 0.5 / (1 + EPS), 2: 0.0}, abs=1e-12)  # No class 3.
  assert mpq == pytest.approx(0.25 / (1 + EPS), abs=1e-12)
  mpq, bpq, per_class = pannuke_pq.image_pq(*images['c'])
  assert (mpq, bpq) == pytest.approx((0.4 / (1 + EPS), 0.4 / (1 + EPS)), abs=1e-12)
  assert per_class == pytest.approx({2: 0.0, 4: 0.8 / (1 + EPS)}, abs=1e-12)
  mpq, bpq, per_class = pannuke_pq.image_pq(*images['e'])
  assert math.isnan(mpq) and per_class == {} and bpq == pytest.approx(1 / (1 + EPS), abs=1e-12)
  for name in ('b', 'd'):
    mpq, bpq, per_class = pannuke_pq.image_pq(*images[name])
    assert math.isnan(mpq) and math.isnan(bpq) and per_class == {}


def test_tissue_pq_hand_case_is_json_ready():
  case = hand_images()
  got = pannuke_pq.tissue_pq([image for _, image in case.values()], list(case),
                             {name: tissue for name, (tissue, _) in case.items()})
  check_expected(got)
  json.dumps(got, allow_nan=False)  # None, never NaN.


def test_tissue_pq_with_no_value_anywhere_gives_none():
  empty = (*boxes({}), *boxes({}))
  got = pannuke_pq.tissue_pq([empty], ['x'], {'x': 'Liver'})
  assert got == {'mpq': None, 'bpq': None,
                 'per_tissue': {'Liver': {'mpq': None, 'bpq': None, 'images': 1}}}


def test_missing_tissue_is_an_error_naming_the_image():
  empty = (*boxes({}), *boxes({}))
  with pytest.raises(ValueError, match="'y'"):
    pannuke_pq.tissue_pq([empty, empty], ['x', 'y'], {'x': 'Liver', 'z': 'Skin'})


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_per_class_and_binary_pq_equal_seg_metrics_pq_on_filtered_maps(seed):
  """PQ_{i,c} is seg_metrics.pq (official get_fast_pq) between the class-c instances only."""
  rng = np.random.default_rng(seed)
  spec = {i: (*rng.integers(0, 26, 2).tolist(), *rng.integers(3, 7, 2).tolist(), int(c))
          for i, c in zip(range(1, 11), rng.integers(1, 4, 10))}

  def image(jitter, p_retype):  # Boxes moved by up to `jitter` px, classes redrawn with p_retype.
    inst, types = np.zeros((32, 32), np.int32), {}
    for i, (r, c, h, w, cls) in spec.items():
      dr, dc = rng.integers(-jitter, jitter + 1, 2).tolist()
      inst[max(r + dr, 0):r + dr + h, max(c + dc, 0):c + dc + w] = i + 20 * (jitter > 0)
      types[i + 20 * (jitter > 0)] = int(rng.integers(1, 4)) if rng.random() < p_retype else cls
    return inst, {i: t for i, t in types.items() if (inst == i).any()}

  (ti, tt), (pi, pt) = image(0, 0.0), image(1, 0.3)
  mpq, bpq, per_class = pannuke_pq.image_pq(ti, tt, pi, pt)
  assert bpq == seg_metrics.pq(ti, pi)[2]
  assert sorted(per_class) == sorted(set(tt.values()))
  for c, value in per_class.items():
    true_c = np.where(np.isin(ti, [i for i, t in tt.items() if t == c]), ti, 0)
    pred_c = np.where(np.isin(pi, [i for i, t in pt.items() if t == c]), pi, 0)
    assert value == pytest.approx(seg_metrics.pq(true_c, pred_c)[2], abs=1e-12)
  assert mpq == pytest.approx(np.mean(list(per_class.values())), abs=1e-12)


def record(inst: np.ndarray, types: dict[int, int]) -> dict:
  """A CoNSeP-style record: rows follow the ascending ids; centroids are (x, y) centres of mass."""
  ids = sorted(types)
  cents = [np.nonzero(inst == i)[::-1] for i in ids]
  return dict(inst_map=inst, inst_type=np.array([types[i] for i in ids], np.int32).reshape(-1, 1),
              inst_centroid=np.array([[c[0].mean(), c[1].mean()] for c in cents]).reshape(-1, 2))


def test_evaluate_dirs_with_tissues_adds_pannuke(tmp_path):
  case = hand_images()
  true_dir, pred_dir = tmp_path / 'true', tmp_path / 'pred'
  true_dir.mkdir()
  pred_dir.mkdir()
  for name, (_, (ti, tt, pi, pt)) in case.items():
    sio.savemat(true_dir / f'{name}.mat', record(ti, tt))
    sio.savemat(pred_dir / f'{name}.mat', record(pi, pt))
  tissues = {name: tissue for name, (tissue, _) in case.items()}
  metrics = records.evaluate_dirs(true_dir, pred_dir, tissues=tissues)
  check_expected(metrics['pannuke'])
  assert json.loads(json.dumps(metrics, allow_nan=False))['pannuke'] == metrics['pannuke']
  table = records.format_table(metrics)
  assert 'PanNuke mPQ' in table and 'Kidney  mPQ n/a  bPQ n/a  images 1' in table
  without = records.evaluate_dirs(true_dir, pred_dir)
  assert 'pannuke' not in without and 'PanNuke' not in records.format_table(without)
  assert without == {k: v for k, v in metrics.items() if k != 'pannuke'}
  del tissues['c']
  with pytest.raises(ValueError, match="no tissue for image 'c'"):
    records.evaluate_dirs(true_dir, pred_dir, tissues=tissues)
  pairs = [(record(ti, tt), record(pi, pt)) for _, (ti, tt, pi, pt) in case.values()]
  with pytest.raises(ValueError, match="no tissue for image 'c'"):
    records.evaluate_arrays(pairs, names=list(case), tissues=tissues)


def test_evaluate_stage_saves_tissues_only_when_tiles_carry_them(tmp_path):
  path = tmp_path / 'eval' / 'run' / 'tissue.json'
  evaluate.save_tissues([{'name': 'a'}, {'name': 'b'}], path)
  assert not path.exists()
  evaluate.save_tissues([{'name': 'b', 'tissue': 'Colon'}, {'name': 'a', 'tissue': 'Breast'}], path)
  assert json.loads(path.read_text()) == {'a': 'Breast', 'b': 'Colon'}
  assert [p.name for p in path.parent.iterdir()] == ['tissue.json']  # No temporary file left.
