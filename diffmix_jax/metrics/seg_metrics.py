"""HoVer-Net nuclei metrics: Dice, AJI, AJI+, DQ/SQ/PQ, F_d, acc and F_c (docs/hovernet.md §5).

NumPy/SciPy only (no JAX). Values equal the official `metrics/stats_utils.py` and `compute_stats.py`
wherever those are defined; all pairwise overlaps of an image come from one contingency table
(np.bincount), not per-instance masks.

Conventions where the official code crashes or divides by zero (docs/hovernet.md §5.1 "Edge cases"):
- truth empty and prediction empty: Dice = AJI = AJI+ = DQ = SQ = PQ = 1.0 (nothing to find, nothing
  wrongly found; the official code gives nan / a crash / ZeroDivisionError);
- truth has nuclei, prediction empty: all six are 0.0 (official AJI crashes; the others are 0);
- truth empty, prediction has nuclei: all six are 0.0 (as official);
- acc with no centroid pairs in the whole data set: 0.0 (official: nan).
"""

from typing import Sequence

import numpy as np
from scipy import optimize
from scipy.spatial import distance

MATCH_IOU = 0.5  # docs/hovernet.md §5.1: PQ pairs need IoU strictly > 0.5.
MATCH_RADIUS = 12.0  # docs/hovernet.md §5.2: centroid pairs need distance <= 12 px (inclusive).
F_C_WEIGHTS = (2, 2, 1, 1)  # docs/hovernet.md §5.2: weights of FP_c, FN_c, FP_d^t, FN_d^t in F_c.
_EPS = 1.0e-6  # The official epsilon of the AJI IoU and of SQ.

_INSTANCE_KEYS = ('dice', 'aji', 'aji_plus', 'dq', 'sq', 'pq')


def instance_ids(inst_map: np.ndarray) -> np.ndarray:
  """The distinct non-zero ids of an instance map.

  Args:
    inst_map: [H, W] non-negative integer instance map.

  Returns:
    [N] int64 ids, ascending.
  """
  x = np.asarray(inst_map).astype(np.int64, copy=False).ravel()
  if x.size == 0:
    return np.zeros(0, np.int64)
  top = int(x.max())
  if x.min() >= 0 and top <= 4 * x.size + 1024:  # Presence table: O(pixels), no sort.
    return np.nonzero(np.bincount(x, minlength=top + 1)[1:])[0] + 1
  ids = np.unique(x)
  return ids[ids > 0]


def remap_label(inst_map: np.ndarray) -> np.ndarray:
  """Renumbers instance ids to 1..N in ascending order of the old id (docs/hovernet.md §5.1, by_size=False).

  Args:
    inst_map: [H, W] non-negative integer instance map, 0 = background, any ids.

  Returns:
    [H, W] int32 map with ids 1..N (0 stays 0); unchanged values (as int32) when there is no instance.

  Raises:
    ValueError: if the map has negative ids.
  """
  x = np.asarray(inst_map).astype(np.int64, copy=False)
  if x.size == 0:
    return x.astype(np.int32)
  if x.min() < 0:
    raise ValueError(f'instance map has negative ids (min {x.min()})')
  top = int(x.max())
  if top == 0:
    return x.astype(np.int32)
  if top <= 4 * x.size + 1024:  # Lookup table: O(pixels), no sort.
    present = np.bincount(x.ravel(), minlength=top + 1) > 0
    present[0] = False
    lut = np.cumsum(present).astype(np.int32)
    return lut[x]
  ids, inverse = np.unique(x, return_inverse=True)
  return (inverse.reshape(x.shape) + (0 if ids[0] == 0 else 1)).astype(np.int32)


def _contingency(true: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Pairwise intersections and areas after remap_label.

  Returns:
    (inter [T, P] int64, true_area [T] int64, pred_area [P] int64), index i meaning remapped id i + 1.
  """
  true = np.asarray(true)
  pred = np.asarray(pred)
  if true.shape != pred.shape:
    raise ValueError(f'true and pred instance maps differ in shape: {true.shape} vs {pred.shape}')
  t = remap_label(true).ravel()
  p = remap_label(pred).ravel()
  nt = int(t.max()) if t.size else 0
  npr = int(p.max()) if p.size else 0
  table = np.bincount(t.astype(np.int64) * (npr + 1) + p, minlength=(nt + 1) * (npr + 1))
  table = table.reshape(nt + 1, npr + 1)
  return table[1:, 1:], table[1:, :].sum(axis=1), table[:, 1:].sum(axis=0)


def _empty_value(nt: int, npr: int) -> float | None:
  """The documented value when a side has no instance (module docstring), else None."""
  if nt == 0 and npr == 0:
    return 1.0
  if nt == 0 or npr == 0:
    return 0.0
  return None


def _dice(inter, ta, pa) -> float:
  """Dice of the binarised maps: 2|T ∩ P| / (|T| + |P|) (docs/hovernet.md §5.1, get_dice_1)."""
  empty = _empty_value(len(ta), len(pa))
  if empty is not None:
    return empty
  return float(2.0 * inter.sum() / (ta.sum() + pa.sum()))


def _aji(inter, ta, pa) -> float:
  """AJI: each truth takes its max-IoU prediction, reuse allowed (docs/hovernet.md §5.1, get_fast_aji)."""
  empty = _empty_value(len(ta), len(pa))
  if empty is not None:
    return empty
  union = ta[:, None] + pa[None, :] - inter
  iou = inter / (union + _EPS)
  best = np.argmax(iou, axis=1)  # Ties go to the smaller (remapped) prediction id.
  rows = np.nonzero(iou[np.arange(len(ta)), best] > 0.0)[0]
  cols = best[rows]
  chosen = np.zeros(len(pa), bool)
  chosen[cols] = True
  unpaired_true = np.ones(len(ta), bool)
  unpaired_true[rows] = False
  total_inter = inter[rows, cols].sum()
  total_union = union[rows, cols].sum() + ta[unpaired_true].sum() + pa[~chosen].sum()
  return float(total_inter / total_union)


def _aji_plus(inter, ta, pa) -> float:
  """AJI+: one-to-one Hungarian pairs maximising IoU (docs/hovernet.md §5.1, get_fast_aji_plus)."""
  empty = _empty_value(len(ta), len(pa))
  if empty is not None:
    return empty
  union = ta[:, None] + pa[None, :] - inter
  iou = inter / (union + _EPS)
  rows, cols = optimize.linear_sum_assignment(-iou)
  keep = iou[rows, cols] > 0.0
  rows, cols = rows[keep], cols[keep]
  unpaired_true = np.ones(len(ta), bool)
  unpaired_true[rows] = False
  unpaired_pred = np.ones(len(pa), bool)
  unpaired_pred[cols] = False
  total_inter = inter[rows, cols].sum()
  total_union = union[rows, cols].sum() + ta[unpaired_true].sum() + pa[unpaired_pred].sum()
  return float(total_inter / total_union)


def _pq(inter, ta, pa, match_iou: float) -> tuple[float, float, float]:
  """(DQ, SQ, PQ) with pairs of IoU strictly > match_iou (docs/hovernet.md §5.1, get_fast_pq)."""
  if match_iou < 0.5:
    raise ValueError(f'match_iou must be >= 0.5 (pairs are then unique); got {match_iou}')
  empty = _empty_value(len(ta), len(pa))
  if empty is not None:
    return empty, empty, empty
  iou = inter / (ta[:, None] + pa[None, :] - inter)
  matched = iou > match_iou
  tp = int(matched.sum())
  fp = len(pa) - tp
  fn = len(ta) - tp
  dq = tp / (tp + 0.5 * fp + 0.5 * fn)
  sq = float(iou[matched].sum() / (tp + _EPS))
  return float(dq), sq, float(dq * sq)


def dice(true: np.ndarray, pred: np.ndarray) -> float:
  """Dice of the foregrounds (docs/hovernet.md §5.1). Args: [H, W] integer instance maps. Returns: float."""
  return _dice(*_contingency(true, pred))


def aji(true: np.ndarray, pred: np.ndarray) -> float:
  """Aggregated Jaccard Index (docs/hovernet.md §5.1). Args: [H, W] integer instance maps. Returns: float."""
  return _aji(*_contingency(true, pred))


def aji_plus(true: np.ndarray, pred: np.ndarray) -> float:
  """AJI+ with Hungarian pairing (docs/hovernet.md §5.1). Args: [H, W] integer instance maps. Returns: float."""
  return _aji_plus(*_contingency(true, pred))


def pq(true: np.ndarray, pred: np.ndarray, match_iou: float = MATCH_IOU) -> tuple[float, float, float]:
  """Detection, segmentation and panoptic quality (docs/hovernet.md §5.1).

  Args:
    true: [H, W] integer ground-truth instance map (any ids).
    pred: [H, W] integer predicted instance map (any ids).
    match_iou: pairs need IoU strictly greater than this (>= 0.5).

  Returns:
    (dq, sq, pq) floats.
  """
  return _pq(*_contingency(true, pred), match_iou)


def instance_metrics(true: np.ndarray, pred: np.ndarray) -> dict[str, float]:
  """All per-image instance metrics from one contingency table (docs/hovernet.md §5.1).

  Args:
    true: [H, W] integer ground-truth instance map (any ids; remapped here).
    pred: [H, W] integer predicted instance map (any ids; remapped here).

  Returns:
    Dict with float `dice`, `aji`, `aji_plus`, `dq`, `sq`, `pq`.
  """
  table = _contingency(true, pred)
  dq, sq, pq_value = _pq(*table, MATCH_IOU)
  values = (_dice(*table), _aji(*table), _aji_plus(*table), dq, sq, pq_value)
  return dict(zip(_INSTANCE_KEYS, values))


def pair_coordinates(true_pts: np.ndarray, pred_pts: np.ndarray,
                     radius: float = MATCH_RADIUS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Hungarian minimum-total-distance pairing of centroids, then distance <= radius (docs/hovernet.md §5.2).

  The points are cast to float32 first, as the official script does; the assignment runs over the full
  distance matrix (it is not a maximum-cardinality matching within the radius).

  Args:
    true_pts: [N, 2] float (x, y) ground-truth centroids.
    pred_pts: [M, 2] float (x, y) predicted centroids.
    radius: largest distance of a kept pair, inclusive.

  Returns:
    (paired [K, 2] int64 rows (true index, pred index), unpaired_true [N - K] int64,
    unpaired_pred [M - K] int64), index arrays ascending.
  """
  a = np.asarray(true_pts, np.float32).reshape(-1, 2).astype(np.float64)
  b = np.asarray(pred_pts, np.float32).reshape(-1, 2).astype(np.float64)
  dist = distance.cdist(a, b, metric='euclidean')
  rows, cols = optimize.linear_sum_assignment(dist)
  keep = dist[rows, cols] <= radius
  paired = np.stack([rows[keep], cols[keep]], axis=-1).astype(np.int64).reshape(-1, 2)
  unpaired_true = np.setdiff1d(np.arange(len(a)), paired[:, 0]).astype(np.int64)
  unpaired_pred = np.setdiff1d(np.arange(len(b)), paired[:, 1]).astype(np.int64)
  return paired, unpaired_true, unpaired_pred


def type_metrics(records: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
                 radius: float = MATCH_RADIUS,
                 weights: Sequence[float] = F_C_WEIGHTS) -> dict:
  """Detection and classification scores pooled over a data set (docs/hovernet.md §5.2).

  Per image, a side without instances gets one dummy point (0, 0) of type 0; pairs are found per image
  and pooled. F_d = 2TP/(2TP + FP + FN); acc = agreeing pairs / pairs; for each type t in the sorted
  pooled ground-truth types (dummies included) F_c^t = 2TP_c / (2TP_c + w0 FP_c + w1 FN_c + w2 FP_d^t
  + w3 FN_d^t) over the pairs where either side is t (TN_c is always 0 there).

  Args:
    records: one (true_centroid [N, 2] float (x, y), true_type [N] int, pred_centroid [M, 2] float,
      pred_type [M] int) per image; types are already merged.
    radius: pairing radius in pixels (inclusive).
    weights: the four F_c weights.

  Returns:
    Dict with `f_d` float, `acc` float (0.0 when there is no pair), `f_c` dict {type id int: float},
    `num_true` and `num_pred` (real instances, dummies not counted), `num_paired` int.
  """
  if not records:
    raise ValueError('type_metrics needs at least one image')
  true_types, pred_types, pairs, lone_true, lone_pred = [], [], [], [], []
  t_off = p_off = num_true = num_pred = 0
  for true_c, true_t, pred_c, pred_t in records:
    true_t = np.asarray(true_t, np.int64).ravel()
    pred_t = np.asarray(pred_t, np.int64).ravel()
    num_true += len(true_t)
    num_pred += len(pred_t)
    if len(true_t) == 0:
      true_c, true_t = np.zeros((1, 2)), np.zeros(1, np.int64)
    if len(pred_t) == 0:
      pred_c, pred_t = np.zeros((1, 2)), np.zeros(1, np.int64)
    paired, unpaired_true, unpaired_pred = pair_coordinates(true_c, pred_c, radius)
    pairs.append(paired + np.array([t_off, p_off]))
    lone_true.append(unpaired_true + t_off)
    lone_pred.append(unpaired_pred + p_off)
    true_types.append(true_t)
    pred_types.append(pred_t)
    t_off += len(true_t)
    p_off += len(pred_t)
  true_types = np.concatenate(true_types)
  pred_types = np.concatenate(pred_types)
  pairs = np.concatenate(pairs)
  paired_true, paired_pred = true_types[pairs[:, 0]], pred_types[pairs[:, 1]]
  lone_true = true_types[np.concatenate(lone_true)]
  lone_pred = pred_types[np.concatenate(lone_pred)]

  tp_d, fp_d, fn_d = len(pairs), len(lone_pred), len(lone_true)
  f_d = 2 * tp_d / (2 * tp_d + fp_d + fn_d)
  acc = float((paired_true == paired_pred).sum() / tp_d) if tp_d else 0.0
  f_c = {}
  for t in np.unique(true_types).tolist():
    sel = (paired_true == t) | (paired_pred == t)
    pt, pp = paired_true[sel], paired_pred[sel]
    tp_c = ((pt == t) & (pp == t)).sum()
    tn_c = ((pt != t) & (pp != t)).sum()  # Always 0 after the selection; kept as in the formula.
    fp_c = ((pt != t) & (pp == t)).sum()
    fn_c = ((pt == t) & (pp != t)).sum()
    fp_dt = (lone_pred == t).sum()
    fn_dt = (lone_true == t).sum()
    num = 2 * (tp_c + tn_c)
    den = num + weights[0] * fp_c + weights[1] * fn_c + weights[2] * fp_dt + weights[3] * fn_dt
    f_c[int(t)] = float(num / den)
  return {'f_d': float(f_d), 'acc': acc, 'f_c': f_c, 'num_true': num_true, 'num_pred': num_pred,
          'num_paired': tp_d}


def class_pq_counts(true_inst: np.ndarray, true_type: dict[int, int], pred_inst: np.ndarray,
                    pred_type: dict[int, int], classes: Sequence[int],
                    match_iou: float = MATCH_IOU) -> dict[int, np.ndarray]:
  """Per class, the PQ counts of one image between the instances of that class only (CoNIC's mPQ+).

  Args:
    true_inst, pred_inst: [H, W] integer instance maps.
    true_type, pred_type: {instance id: class id} for the ids of each map.
    classes: the class ids to count (background 0 is not one).
    match_iou: pairs need IoU strictly greater than this (>= 0.5: pairs are unique).

  Returns:
    {class: float64 [4] (TP, FP, FN, sum of the TP pairs' IoU)}.
  """
  def class_map(inst, types):  # int [H, W]: each pixel's instance class (0 = background).
    inst = np.asarray(inst, np.int64)
    lut = np.zeros(max(int(inst.max(initial=0)), max(types, default=0)) + 1, np.int64)
    lut[list(types)] = list(types.values())
    return inst, lut[inst]

  (ti, tc), (pi, pc) = class_map(true_inst, true_type), class_map(pred_inst, pred_type)
  out = {}
  for c in classes:
    inter, ta, pa = _contingency(np.where(tc == c, ti, 0), np.where(pc == c, pi, 0))
    iou = inter / np.maximum(ta[:, None] + pa[None, :] - inter, 1)
    matched = iou > match_iou
    tp = int(matched.sum())
    out[c] = np.array([tp, len(pa) - tp, len(ta) - tp, iou[matched].sum()], np.float64)
  return out


def multi_class_pq(counts: dict[int, np.ndarray]) -> tuple[float | None, dict[int, float]]:
  """mPQ+ of the CoNIC challenge from counts pooled over a split (sums of `class_pq_counts`).

  PQ_c = DQ_c SQ_c with DQ_c = TP / (TP + FP/2 + FN/2 + 1e-6) and SQ_c = sum IoU / (TP + 1e-6); a class
  with no TP, FP or FN (absent from truth and prediction) is left out; mPQ+ is the mean of the rest.

  Returns:
    (mPQ+ or None when no class is present, {class: PQ_c} of the classes kept).
  """
  per_class = {}
  for c, (tp, fp, fn, iou_sum) in sorted(counts.items()):
    if tp + fp + fn == 0:
      continue
    per_class[c] = float(tp / (tp + 0.5 * fp + 0.5 * fn + _EPS) * (iou_sum / (tp + _EPS)))
  return (float(np.mean(list(per_class.values()))) if per_class else None), per_class
