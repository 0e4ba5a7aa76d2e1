"""Tests of diffmix_jax.metrics.seg_metrics against hand-computed values (docs/hovernet.md §5)."""

import numpy as np
from scipy import optimize
import pytest

from diffmix_jax.metrics import seg_metrics

EPS = 1e-6  # The official epsilon of SQ and of the AJI IoU.


def boxes(shape, spec) -> np.ndarray:
  """Instance map from {id: (r0, r1, c0, c1)} half-open boxes, painted in order."""
  out = np.zeros(shape, np.int32)
  for i, (r0, r1, c0, c1) in spec.items():
    out[r0:r1, c0:c1] = i
  return out


def all_metrics(true, pred) -> dict:
  dq, sq, pq = seg_metrics.pq(true, pred)
  individual = dict(dice=seg_metrics.dice(true, pred), aji=seg_metrics.aji(true, pred),
                    aji_plus=seg_metrics.aji_plus(true, pred), dq=dq, sq=sq, pq=pq)
  assert seg_metrics.instance_metrics(true, pred) == pytest.approx(individual, abs=1e-15)
  return individual


def test_remap_label_renumbers_in_ascending_order_of_old_id():
  x = np.array([[0, 7, 3], [3, 12, 0]])
  np.testing.assert_array_equal(seg_metrics.remap_label(x), [[0, 2, 1], [1, 3, 0]])
  huge = np.where(x > 0, x + 10**9, 0)  # The sort path for very large ids.
  np.testing.assert_array_equal(seg_metrics.remap_label(huge), [[0, 2, 1], [1, 3, 0]])
  assert seg_metrics.remap_label(x).dtype == np.int32
  np.testing.assert_array_equal(seg_metrics.remap_label(np.zeros((2, 2))), np.zeros((2, 2)))
  with pytest.raises(ValueError, match='negative'):
    seg_metrics.remap_label(np.array([[0, -1]]))


def test_two_3x3_nuclei_under_one_3x8_prediction():
  # docs/hovernet.md §5.1 worked example: AJI 0.375, AJI+ 0.2727, PQ 0.
  true = boxes((5, 10), {1: (0, 3, 0, 3), 2: (0, 3, 5, 8)})
  pred = boxes((5, 10), {1: (0, 3, 0, 8)})
  m = all_metrics(true, pred)
  assert m['aji'] == pytest.approx(0.375, abs=1e-12)  # (9 + 9) / (24 + 24): the prediction is reused.
  assert m['aji_plus'] == pytest.approx(9 / 33, abs=1e-12)  # 9 / (24 + 9 unpaired truth).
  assert m['aji_plus'] == pytest.approx(0.2727, abs=1e-4)
  assert (m['dq'], m['sq'], m['pq']) == (0.0, 0.0, 0.0)
  assert m['dice'] == pytest.approx(2 * 18 / (18 + 24), abs=1e-12)


def test_iou_exactly_one_half_is_not_a_pq_match():
  true = boxes((4, 6), {1: (0, 2, 0, 4)})  # 8 px.
  half = boxes((4, 6), {5: (0, 2, 0, 2)})  # 4 px inside: IoU = 4 / 8 = 0.5.
  assert seg_metrics.pq(true, half) == (0.0, 0.0, 0.0)
  three_quarters = boxes((4, 6), {5: (0, 2, 0, 3)})  # IoU = 6 / 8.
  dq, sq, pq = seg_metrics.pq(true, three_quarters)
  assert dq == 1.0 and sq == pytest.approx(0.75 / (1 + EPS), abs=1e-15)
  assert pq == pytest.approx(0.75 / (1 + EPS), abs=1e-15)


def test_shuffled_non_contiguous_prediction_ids():
  shape = (10, 20)
  true = boxes(shape, {1: (0, 4, 0, 4), 2: (0, 4, 6, 10), 3: (6, 9, 0, 3), 4: (6, 9, 15, 18)})
  pred = boxes(shape, {40: (0, 4, 0, 3), 9: (0, 4, 3, 8), 2: (0, 4, 8, 10), 7: (6, 9, 1, 5),
                       13: (8, 10, 10, 13)})
  # IoUs: g1-p40 12/16, g1-p9 4/32, g2-p9 8/28, g2-p2 8/16 (= 0.5), g3-p7 6/15; g4 and p13 alone.
  m = all_metrics(true, pred)
  # AJI: g1-p40, g2-p2, g3-p7; g4 (9 px) unpaired; p9 (20 px), p13 (6 px) never chosen.
  assert m['aji'] == pytest.approx((12 + 8 + 6) / (16 + 16 + 15 + 9 + 20 + 6), abs=1e-12)
  assert m['aji_plus'] == pytest.approx((12 + 8 + 6) / (16 + 16 + 15 + 9 + 20 + 6), abs=1e-12)
  # PQ: only g1-p40 (0.75) is > 0.5. TP 1, FP 4, FN 3.
  dq = 1 / (1 + 0.5 * 4 + 0.5 * 3)
  assert m['dq'] == pytest.approx(dq, abs=1e-12)
  assert m['sq'] == pytest.approx(0.75 / (1 + EPS), abs=1e-12)
  assert m['pq'] == pytest.approx(dq * 0.75 / (1 + EPS), abs=1e-12)
  # Dice: truth 50 px, prediction 58 px, overlap 16 + 16 + 6.
  assert m['dice'] == pytest.approx(2 * 38 / (50 + 58), abs=1e-12)
  # Relabelling the prediction changes nothing.
  assert all_metrics(true, np.where(pred > 0, 1000 - pred, 0)) == pytest.approx(m, abs=1e-15)


def test_aji_reuses_the_argmax_prediction_while_aji_plus_pairs_one_to_one():
  true = boxes((1, 20), {1: (0, 1, 0, 10), 2: (0, 1, 10, 20)})
  pred = boxes((1, 20), {8: (0, 1, 3, 15), 3: (0, 1, 0, 3)})
  # g1-p8 7/15, g1-p3 3/10, g2-p8 5/17. AJI: both truths take p8; p3 (3 px) unchosen.
  m = all_metrics(true, pred)
  assert m['aji'] == pytest.approx((7 + 5) / (15 + 17 + 3), abs=1e-12)
  # AJI+: 3/10 + 5/17 > 7/15, so g1-p3 and g2-p8.
  assert m['aji_plus'] == pytest.approx((3 + 5) / (10 + 17), abs=1e-12)
  assert m['pq'] == 0.0 and m['dice'] == pytest.approx(2 * 15 / 35, abs=1e-12)


def test_empty_images_have_documented_values():
  gt = boxes((6, 6), {1: (0, 2, 0, 2)})
  empty = np.zeros((6, 6), np.int32)
  assert all_metrics(empty, empty) == dict.fromkeys(['dice', 'aji', 'aji_plus', 'dq', 'sq', 'pq'], 1.0)
  assert all_metrics(gt, empty) == dict.fromkeys(['dice', 'aji', 'aji_plus', 'dq', 'sq', 'pq'], 0.0)
  assert all_metrics(empty, gt) == dict.fromkeys(['dice', 'aji', 'aji_plus', 'dq', 'sq', 'pq'], 0.0)
  with pytest.raises(ValueError, match='shape'):
    seg_metrics.dice(gt, gt[:5])


def _reference_instance_metrics(true, pred):
  """Per-instance-mask reference of docs/hovernet.md §5.1 (slow; for small random maps)."""
  t_ids = [i for i in np.unique(true) if i]
  p_ids = [i for i in np.unique(pred) if i]
  inter = np.array([[((true == t) & (pred == p)).sum() for p in p_ids] for t in t_ids], float)
  union = np.array([[((true == t) | (pred == p)).sum() for p in p_ids] for t in t_ids], float)
  iou = inter / (union + EPS)
  best = iou.argmax(1)
  rows = [r for r in range(len(t_ids)) if iou[r, best[r]] > 0]
  chosen = {best[r] for r in rows}
  aji = inter[rows, best[rows]].sum() / (
      union[rows, best[rows]].sum() + sum((true == t_ids[r]).sum() for r in range(len(t_ids))
                                          if r not in rows)
      + sum((pred == p_ids[c]).sum() for c in range(len(p_ids)) if c not in chosen))
  r, c = optimize.linear_sum_assignment(-iou)
  keep = iou[r, c] > 0
  r, c = r[keep], c[keep]
  aji_plus = inter[r, c].sum() / (
      union[r, c].sum() + sum((true == t_ids[i]).sum() for i in range(len(t_ids)) if i not in r)
      + sum((pred == p_ids[j]).sum() for j in range(len(p_ids)) if j not in c))
  strict = inter / union
  tp = (strict > 0.5).sum()
  dq = tp / (tp + 0.5 * (len(p_ids) - tp) + 0.5 * (len(t_ids) - tp))
  sq = strict[strict > 0.5].sum() / (tp + EPS)
  return dict(dice=2 * ((true > 0) & (pred > 0)).sum() / ((true > 0).sum() + (pred > 0).sum()),
              aji=aji, aji_plus=aji_plus, dq=dq, sq=sq, pq=dq * sq)


@pytest.mark.parametrize('seed', range(4))
def test_vectorised_metrics_equal_a_per_mask_reference_on_random_maps(seed):
  rng = np.random.default_rng(seed)

  def random_map():
    spec = {}
    for i in rng.choice(np.arange(1, 500), 12, replace=False):
      r, c = rng.integers(0, 40, 2)
      spec[int(i)] = (r, r + rng.integers(3, 10), c, c + rng.integers(3, 10))
    return boxes((48, 48), spec)

  true, pred = random_map(), random_map()
  assert seg_metrics.instance_metrics(true, pred) == pytest.approx(
      _reference_instance_metrics(true, pred), abs=1e-12)


def test_pairing_radius_is_inclusive_and_uses_float32_points():
  paired, lone_t, lone_p = seg_metrics.pair_coordinates([[10, 10]], [[22, 10]])
  np.testing.assert_array_equal(paired, [[0, 0]])  # Exactly 12 px: a match.
  assert lone_t.size == 0 and lone_p.size == 0
  paired, lone_t, lone_p = seg_metrics.pair_coordinates([[10, 10]], [[22.01, 10]])
  assert paired.shape == (0, 2) and lone_t.tolist() == [0] and lone_p.tolist() == [0]
  # 12.000001 px in float64 but exactly 12 after the official float32 cast (268.000001 -> 268).
  paired, _, _ = seg_metrics.pair_coordinates([[256.0, 50.0]], [[268.000001, 50.0]])
  assert paired.shape == (1, 2)


def test_pairing_is_hungarian_minimum_total_distance_over_the_full_matrix():
  # Greedy nearest-first would pair a2-b1 (4 px) and leave a1 alone; min-sum pairs both.
  paired, _, _ = seg_metrics.pair_coordinates([[0, 0], [10, 0]], [[6, 0], [17, 0]])
  np.testing.assert_array_equal(paired, [[0, 0], [1, 1]])
  # Both a1-b1 (12) and a2-b2 (12) are within the radius, but the min-sum assignment is
  # a1-b2 (16.97, dropped) + a2-b1 (0): one pair, not a maximum-cardinality matching.
  paired, lone_t, lone_p = seg_metrics.pair_coordinates([[8, 20], [20, 20]], [[20, 20], [20, 32]])
  np.testing.assert_array_equal(paired, [[1, 0]])
  assert lone_t.tolist() == [0] and lone_p.tolist() == [1]


def test_type_metrics_pooled_by_hand():
  image1 = (np.array([[10, 10], [50, 50], [100, 100], [150, 150], [200, 200]], float),
            np.array([1, 2, 2, 3, 4]),
            np.array([[12, 10], [50, 53], [100, 104], [151, 150], [300, 300], [350, 350],
                      [400, 400]], float),
            np.array([1, 0, 3, 3, 1, 0, 3]))
  # Empty prediction: a dummy (0, 0) of type 0, too far from both nuclei to pair.
  image2 = (np.array([[30, 30], [60, 60]], float), np.array([4, 1]), np.zeros((0, 2)),
            np.zeros(0, int))
  m = seg_metrics.type_metrics([image1, image2])
  # Pairs (gt, pred types): (1, 1), (2, 0), (2, 3), (3, 3). Unpaired truth: 4, 4, 1.
  # Unpaired predictions: 1, 0, 3 and the dummy 0.
  assert m['f_d'] == pytest.approx(2 * 4 / (2 * 4 + 4 + 3), abs=1e-12)
  assert m['acc'] == pytest.approx(2 / 4, abs=1e-12)
  assert list(m['f_c']) == [1, 2, 3, 4]
  assert m['f_c'][1] == pytest.approx(2 / (2 + 1 + 1), abs=1e-12)  # FP_d^1 1, FN_d^1 1.
  assert m['f_c'][2] == 0.0  # Two pairs with FN_c: one against a type-0 prediction.
  assert m['f_c'][3] == pytest.approx(2 / (2 + 2 * 1 + 1), abs=1e-12)  # FP_c 1, FP_d^3 1.
  assert m['f_c'][4] == 0.0
  assert (m['num_true'], m['num_pred'], m['num_paired']) == (7, 7, 4)


def test_type_metrics_dummy_points_for_empty_images():
  # Empty truth: the dummy (0, 0) of type 0 pairs with the prediction at (5, 5) (7.07 px).
  m = seg_metrics.type_metrics([(np.zeros((0, 2)), np.zeros(0), np.array([[5, 5], [100, 100]]),
                                 np.array([2, 1]))])
  assert m['f_d'] == pytest.approx(2 / 3, abs=1e-12) and m['acc'] == 0.0
  assert m['f_c'] == {0: 0.0}
  assert (m['num_true'], m['num_pred']) == (0, 2)
  # Both empty: the two dummies pair, so everything is 1.
  m = seg_metrics.type_metrics([(np.zeros((0, 2)), np.zeros(0), np.zeros((0, 2)), np.zeros(0))])
  assert (m['f_d'], m['acc'], m['f_c']) == (1.0, 1.0, {0: 1.0})
  # No pair at all: acc is 0.0 by convention (official: nan).
  m = seg_metrics.type_metrics([(np.array([[100, 100]]), np.array([3]), np.array([[300, 300]]),
                                 np.array([3]))])
  assert (m['f_d'], m['acc'], m['f_c']) == (0.0, 0.0, {3: 0.0})
  with pytest.raises(ValueError, match='at least one'):
    seg_metrics.type_metrics([])


def test_multi_class_pq_on_a_hand_computed_case():
  """CoNIC's mPQ+: per class, pairs between instances of that class only, counts pooled over images.

  Image A: true 1 (class 1, 4 px) predicted exactly as class 1 -> class 1 TP, IoU 1; true 2 (class
  2, 4 px) predicted at the same pixels but as class 1 -> a class-1 FP and a class-2 FN.
  Image B: true 1 (class 2, 4 px) predicted as class 2 over 3 of its pixels and 2 more (IoU 3/6 =
  0.5: not a pair) -> class-2 FP and FN; true 2 (class 2, 4 px) predicted over all 4 and 1 more
  (IoU 4/5) -> class-2 TP. Class 3 appears nowhere and is left out.
  Class 1: TP 1, FP 1, FN 0, IoU sum 1 -> PQ = 1 / 1.5 * 1 = 2/3.
  Class 2: TP 1, FP 1, FN 2, IoU sum 0.8 -> PQ = 1 / 2.5 * 0.8 = 0.32. mPQ+ = (2/3 + 0.32) / 2.
  """
  a_true = np.zeros((6, 6), np.int32)
  a_true[0:2, 0:2], a_true[3:5, 3:5] = 1, 2
  a_pred = a_true.copy()
  b_true = np.zeros((6, 6), np.int32)
  b_true[0:2, 0:2], b_true[3:5, 3:5] = 1, 2
  b_pred = np.zeros((6, 6), np.int32)
  b_pred[0:2, 0:2], b_pred[0, 1] = 7, 0  # 3 of true 1's pixels ...
  b_pred[0, 2:4] = 7  # ... and 2 outside it: IoU 3 / 6.
  b_pred[3:5, 3:5], b_pred[5, 3] = 9, 9  # IoU 4 / 5.
  counts = {}
  for true, tt, pred, pt in ((a_true, {1: 1, 2: 2}, a_pred, {1: 1, 2: 1}),
                             (b_true, {1: 2, 2: 2}, b_pred, {7: 2, 9: 2})):
    for c, v in seg_metrics.class_pq_counts(true, tt, pred, pt, [1, 2, 3]).items():
      counts[c] = counts.get(c, 0) + v
  np.testing.assert_allclose(counts[1], [1, 1, 0, 1.0])
  np.testing.assert_allclose(counts[2], [1, 1, 2, 0.8])
  np.testing.assert_allclose(counts[3], [0, 0, 0, 0])
  mpq, per_class = seg_metrics.multi_class_pq(counts)
  assert set(per_class) == {1, 2}
  assert per_class[1] == pytest.approx(2 / 3, abs=1e-5)
  assert per_class[2] == pytest.approx(0.32, abs=1e-5)
  assert mpq == pytest.approx((2 / 3 + 0.32) / 2, abs=1e-5)
  assert seg_metrics.multi_class_pq({3: np.zeros(4)}) == (None, {})
