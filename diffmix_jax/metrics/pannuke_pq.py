"""PanNuke's evaluation (Gamper et al. 2020): per-image mPQ and bPQ, averaged per tissue type.

NumPy only. The formulas are those of the official PanNuke evaluation script; each PQ is the one of
`seg_metrics.pq` (official `get_fast_pq`): pairs of IoU strictly > 0.5, PQ = DQ * SQ with
DQ = TP / (TP + FP/2 + FN/2) and SQ = sum of the pairs' IoU / (TP + 1e-6).

For image i:
- bPQ_i: PQ between the two instance maps, every nucleus whatever its class (type-0 ones included);
  NaN (left out) when the truth of the image holds no nucleus.
- PQ_{i,c} for each class c > 0: PQ between the true instances of class c only and the predicted
  instances of class c only; NaN (left out) when the truth of image i holds no instance of class c.
  As in the official script, predicted nuclei of a class absent from that image's truth are then
  counted nowhere (they are no false positives of mPQ; they still are of bPQ).
- mPQ_i: the mean of the PQ_{i,c} that are not NaN (NaN when all are, e.g. empty truth).
Per tissue t, mPQ_t and bPQ_t are the means over the images of t of the mPQ_i / bPQ_i that are not
NaN; the overall mPQ and bPQ are the means over tissues of the mPQ_t / bPQ_t that are not NaN (the
tissue-averaged figures of the PanNuke paper's tables). NaN is written as None in the result.
"""

import math
from typing import Any, Mapping, Sequence

import numpy as np

from diffmix_jax.metrics import seg_metrics

SQ_EPS = 1.0e-6  # The official epsilon of SQ (get_fast_pq).

# One image: (true inst_map [H, W] int, {true id: class}, pred inst_map [H, W] int, {pred id: class}).
TypedImage = tuple[np.ndarray, dict[int, int], np.ndarray, dict[int, int]]


def _nanmean(values: Sequence[float]) -> float:
  """Mean of the values that are not NaN; NaN when none is (np.nanmean without its warning)."""
  x = np.asarray(values, np.float64).ravel()
  x = x[~np.isnan(x)]
  return float(x.mean()) if x.size else math.nan


def _json_value(x: float) -> float | None:
  """`x` as a JSON-ready float: None for NaN."""
  return None if math.isnan(x) else float(x)


def image_pq(true_inst: np.ndarray, true_type: dict[int, int], pred_inst: np.ndarray,
             pred_type: dict[int, int]) -> tuple[float, float, dict[int, float]]:
  """PanNuke's per-image scores (module docstring).

  Args:
    true_inst: [H, W] integer ground-truth instance map (any ids, 0 = background).
    true_type: {true instance id: class id}; ids missing here have class 0 (count only in bPQ).
    pred_inst: [H, W] integer predicted instance map, the same shape.
    pred_type: {predicted instance id: class id}.

  Returns:
    (mPQ_i, bPQ_i, {class: PQ_{i,c}}) floats, NaN where left out; the dict holds the classes of the
    true instances (class 0 excluded), ascending.
  """
  present = seg_metrics.instance_ids(true_inst).tolist()
  bpq = seg_metrics.pq(true_inst, pred_inst)[2] if present else math.nan
  classes = sorted({true_type[i] for i in present if true_type.get(i, 0) > 0})
  counts = seg_metrics.class_pq_counts(true_inst, true_type, pred_inst, pred_type, classes)
  per_class = {}
  for c in classes:
    tp, fp, fn, iou_sum = counts[c]  # TP + FN >= 1: the truth holds class c.
    per_class[c] = float(tp / (tp + 0.5 * fp + 0.5 * fn) * (iou_sum / (tp + SQ_EPS)))
  return _nanmean(list(per_class.values())), float(bpq), per_class


def check_tissues(names: Sequence[str], tissues: Mapping[str, str]) -> None:
  """Raises ValueError naming the first image without a tissue (names absent from `names` are fine).

  Args:
    names: image names.
    tissues: {image name: tissue name}.
  """
  missing = [n for n in names if n not in tissues]
  if missing:
    raise ValueError(f'no tissue for image {missing[0]!r} ({len(missing)} of {len(names)} images '
                     f'have none; expected tissues {{image name: tissue name}} for every image)')


def tissue_pq(images: Sequence[TypedImage], names: Sequence[str],
              tissues: Mapping[str, str]) -> dict[str, Any]:
  """PanNuke's mPQ and bPQ per tissue and averaged over tissues (module docstring).

  Args:
    images: one (true inst_map [H, W] int, {id: class}, pred inst_map [H, W] int, {id: class}) per
      image, as `image_pq` takes them.
    names: the images' names, the same length.
    tissues: {image name: tissue name}; every name of `names` needs one.

  Returns:
    JSON-ready dict: `mpq` and `bpq` (float, or None when no tissue has a value), `per_tissue`
    {tissue: {'mpq': float | None, 'bpq': float | None, 'images': int}} in tissue-name order.

  Raises:
    ValueError: naming the image, for an image without a tissue; when the lengths differ.
  """
  if len(images) != len(names):
    raise ValueError(f'tissue_pq: {len(images)} images but {len(names)} names')
  check_tissues(names, tissues)
  scores = {}  # tissue -> [(mPQ_i, bPQ_i)]
  for name, image in zip(names, images):
    mpq, bpq, _ = image_pq(*image)
    scores.setdefault(tissues[name], []).append((mpq, bpq))
  means = {t: (_nanmean([m for m, _ in s]), _nanmean([b for _, b in s]), len(s))
           for t, s in sorted(scores.items())}
  per_tissue = {t: {'mpq': _json_value(m), 'bpq': _json_value(b), 'images': n}
                for t, (m, b, n) in means.items()}
  return {'mpq': _json_value(_nanmean([m for m, _, _ in means.values()])),
          'bpq': _json_value(_nanmean([b for _, b, _ in means.values()])),
          'per_tissue': per_tissue}
