"""HoVer-Net post-processing: NP/HV maps to instances, per-instance info and type (docs/hovernet.md §4).

Host NumPy/SciPy/scikit-image/OpenCV only (no JAX). OpenCV is used where the official code uses it, so the
border rules and rounding of the ksize-21 Sobel, the 3×3 Gaussian, the min-max normalisation, the 5×5
ellipse opening and the contour test are the official ones (docs/differences.md §2.13, §2.14, §2.15). Post-processing
must run on the whole stitched tile: the min-max normalisations are global.
"""

from typing import Any, Mapping, NamedTuple

import cv2
import numpy as np
from scipy import ndimage
from skimage import segmentation

from tfds_builders import instances


class Params(NamedTuple):
  """Thresholds and sizes of the post-processing; the defaults are the official ones (docs/hovernet.md
  §4.1), set for 40x CoNSeP nuclei (median areas 80-347 px). `config.eval.postprocess` holds them."""
  np_threshold: float = 0.5  # Step 1: foreground is np >= np_threshold.
  edge_threshold: float = 0.4  # Step 8: marker interior is E < edge_threshold.
  min_area: int = 10  # Steps 2 and 8: components with fewer px are removed (strictly less).
  sobel_ksize: int = 21  # Step 4: odd, 1-31 (OpenCV's limit).
  marker_open: int = 5  # Step 8: the markers' elliptic opening kernel, odd px (1: no opening).


OFFICIAL = Params()


class Ranges(NamedTuple):
  """(min, max) of the raw maps over a whole image that is post-processed in parts (a slide in
  chunks): h, v, and their Sobel derivatives (x of h, y of v; reflect-101 borders, `sobel_ksize`).
  With them each part is normalised as the whole image would be (steps 3 and 5 are image-wide)."""
  h: tuple[float, float]
  v: tuple[float, float]
  sobel_h: tuple[float, float]
  sobel_v: tuple[float, float]


def raw_ranges(h: np.ndarray, v: np.ndarray, ksize: int = OFFICIAL.sobel_ksize,
               region: tuple[slice, slice] = (slice(None), slice(None))) -> Ranges:
  """The `Ranges` of `region` of [H, W] maps h, v (derivatives taken over the whole maps, so a region
  at least ksize // 2 px inside them sees what the whole image sees); combine with `merge_ranges`."""
  h, v = np.asarray(h, np.float32), np.asarray(v, np.float32)
  sh = cv2.Sobel(h, cv2.CV_64F, 1, 0, ksize=ksize, borderType=cv2.BORDER_REFLECT_101)
  sv = cv2.Sobel(v, cv2.CV_64F, 0, 1, ksize=ksize, borderType=cv2.BORDER_REFLECT_101)
  ext = lambda x: (float(x[region].min()), float(x[region].max()))
  return Ranges(ext(h), ext(v), ext(sh), ext(sv))


def merge_ranges(a: Ranges | None, b: Ranges) -> Ranges:
  if a is None:
    return b
  return Ranges(*[(min(x[0], y[0]), max(x[1], y[1])) for x, y in zip(a, b)])


def params_from(fields: Mapping[str, Any]) -> Params:
  """`Params` from `config.eval.postprocess` (a ConfigDict or its JSON dict), checked.

  Raises:
    ValueError: naming the field, on a missing or unknown field or a value out of range.
  """
  names = set(Params._fields)
  if set(fields.keys()) != names:
    raise ValueError(f'config.eval.postprocess: expected the fields {sorted(names)}; got '
                     f'{sorted(fields.keys())}')
  p = Params(**{k: fields[k] for k in Params._fields})
  for name in ('np_threshold', 'edge_threshold'):
    if not 0 < getattr(p, name) < 1:
      raise ValueError(f'config.eval.postprocess.{name}: expected a value in (0, 1); got '
                       f'{getattr(p, name)!r}')
  for name, low, high in (('min_area', 1, 10**6), ('sobel_ksize', 1, 31), ('marker_open', 1, 99)):
    v = getattr(p, name)
    if not isinstance(v, int) or not low <= v <= high or (name != 'min_area' and v % 2 == 0):
      odd = '' if name == 'min_area' else 'odd '
      raise ValueError(f'config.eval.postprocess.{name}: expected an {odd}integer in [{low}, {high}]; '
                       f'got {v!r}')
  return p


def remove_small_objects(label_map: np.ndarray, min_size: int) -> np.ndarray:
  """Zeroes every labelled component with fewer than `min_size` pixels (docs/hovernet.md §4.1 steps 2, 8).

  The official repo's own rule (bincount of ids, strictly less), not scikit-image's, whose boundary
  changed in 0.26 (docs/differences.md §2.8).

  Args:
    label_map: [H, W] non-negative integer labels, 0 = background.
    min_size: components with area < min_size are removed; area == min_size is kept.

  Returns:
    [H, W] copy of `label_map` (same dtype) with the small components set to 0.
  """
  out = np.array(label_map, copy=True)
  if out.size == 0 or out.max() <= 0:
    return out
  sizes = np.bincount(out.ravel())
  too_small = sizes < min_size
  too_small[0] = False
  out[too_small[out]] = 0
  return out


def _minmax(x: np.ndarray, lo_hi: tuple[float, float] | None = None) -> np.ndarray:
  """cv2.normalize(NORM_MINMAX) to [0, 1] as float32 (over `lo_hi` when given, else x's own range);
  a constant input gives all zeros."""
  if lo_hi is None:
    return cv2.normalize(x, None, alpha=0, beta=1, norm_type=cv2.NORM_MINMAX, dtype=cv2.CV_32F)
  lo, hi = lo_hi
  return ((x - lo) * (1.0 / (hi - lo)) if hi > lo else np.zeros_like(x)).astype(np.float32)


def sobel_edges(h: np.ndarray, v: np.ndarray, ksize: int = OFFICIAL.sobel_ksize,
                ranges: Ranges | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Edge maps of the HV channels (docs/hovernet.md §4.1 steps 3-5).

  h and v are min-max normalised to [0, 1] over the whole tile, differentiated with the separable,
  unnormalised Sobel of size `ksize` (derivative along x for h, along y for v; reflect-101
  borders), and each result becomes 1 - min-max(result).

  Args:
    h: [H, W] float horizontal (x) HV channel.
    v: [H, W] float vertical (y) HV channel.
    ksize: the Sobel kernel size (official 21).
    ranges: image-wide ranges for a part of an image (None: this tile's own, the official rule).

  Returns:
    (sh, sv): [H, W] float32 each, in [0, 1]; low where the HV map changes fast (nucleus borders).
  """
  r = ranges
  h01 = _minmax(np.asarray(h, np.float32), r and r.h)
  v01 = _minmax(np.asarray(v, np.float32), r and r.v)
  sh = cv2.Sobel(h01, cv2.CV_64F, 1, 0, ksize=ksize, borderType=cv2.BORDER_REFLECT_101)
  sv = cv2.Sobel(v01, cv2.CV_64F, 0, 1, ksize=ksize, borderType=cv2.BORDER_REFLECT_101)
  # The Sobel is linear and kills offsets: the derivative of (x - lo) / (hi - lo) spans the raw
  # derivative's range divided by (hi - lo).
  scaled = lambda s, x: (s[0] / (x[1] - x[0]), s[1] / (x[1] - x[0])) if x[1] > x[0] else (0.0, 0.0)
  return (1 - _minmax(sh, r and scaled(r.sobel_h, r.h)), 1 - _minmax(sv, r and scaled(r.sobel_v, r.v)))


def separate_instances(np_prob: np.ndarray, h: np.ndarray, v: np.ndarray,
                       params: Params = OFFICIAL, ranges: Ranges | None = None) -> np.ndarray:
  """Marker-controlled watershed on the NP and HV maps (docs/hovernet.md §4.1 steps 1-9).

  Args:
    np_prob: [H, W] float nucleus probability, softmax(NP)[..., 1].
    h: [H, W] float raw HV channel 0 (x).
    v: [H, W] float raw HV channel 1 (y).
    params: thresholds and sizes (official by default).
    ranges: image-wide ranges when this is a part of an image (`sobel_edges`).

  Returns:
    [H, W] int32 instance map labelled with the marker ids (non-contiguous ids are possible; nuclei
    without a surviving marker are 0).
  """
  # Steps 1-2: foreground, 4-connected components, drop those < min_area px, binarise.
  blb = (np.asarray(np_prob) >= params.np_threshold).astype(np.int32)
  blb = remove_small_objects(ndimage.label(blb)[0], params.min_area)
  blb = (blb > 0).astype(np.int32)
  # Steps 3-6: edge maps, combined; background forced to 0 (float64 as in the official dtype flow).
  sh, sv = sobel_edges(h, v, params.sobel_ksize, ranges)
  edge = np.maximum(sh, sv) - (1 - blb)
  edge[edge < 0] = 0
  # Step 7: energy = -Gaussian3x3((1 - E) * blb), sigma 0 -> weights [0.25, 0.5, 0.25], reflect-101.
  dist = (1.0 - edge) * blb
  dist = -cv2.GaussianBlur(dist, (3, 3), 0, borderType=cv2.BORDER_REFLECT_101)
  # Steps 8-9: markers, then watershed of the energy inside the foreground (4-connectivity).
  inst_map = segmentation.watershed(dist, markers=markers(blb, edge, params), mask=blb.astype(bool))
  return inst_map.astype(np.int32)


def markers(blb: np.ndarray, edge: np.ndarray, params: Params = OFFICIAL) -> np.ndarray:
  """Watershed markers (docs/hovernet.md §4.1 step 8).

  M = blb - (E >= 0.4) clipped at 0; holes filled; opened with the 5x5 ellipse (OpenCV borders: the
  outside never erodes); labelled 4-connected; markers with fewer than 10 px removed.

  Args:
    blb: [H, W] int 0/1 cleaned foreground.
    edge: [H, W] float combined edge map E (0 on background).
    params: thresholds and sizes (official: 0.4, the 5x5 ellipse, 10 px).

  Returns:
    [H, W] int32 marker labels (ids may be non-contiguous).
  """
  marker = np.asarray(blb, np.int32) - (np.asarray(edge) >= params.edge_threshold).astype(np.int32)
  marker[marker < 0] = 0
  marker = ndimage.binary_fill_holes(marker).astype(np.uint8)
  k = params.marker_open
  kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
  marker = cv2.morphologyEx(marker, cv2.MORPH_OPEN, kernel)
  return remove_small_objects(ndimage.label(marker)[0], params.min_area).astype(np.int32)


def instance_info(inst_map: np.ndarray, type_map: np.ndarray) -> dict[int, dict[str, Any]]:
  """Per-instance bbox, contour, centroid and type vote (docs/hovernet.md §4.2).

  An instance whose first OpenCV contour (RETR_TREE, CHAIN_APPROX_SIMPLE, on its bbox crop) has fewer
  than 3 points is left out of the result but stays in `inst_map` (docs/differences.md §2.15).

  Args:
    inst_map: [H, W] non-negative integer instance map (any ids).
    type_map: [H, W] non-negative integer type map (argmax of TP).

  Returns:
    Dict from instance id (int, ascending) to a dict with `bbox` [[rmin, cmin], [rmax, cmax]] int64
    (exclusive max), `centroid` [2] float64 (x, y), `contour` [K, 2] int32 (x, y, tile coordinates),
    `type` int (count vote; a tie goes to the smaller id; background only when it is the only value) and
    `type_prob` float (count of the chosen type / (area + 1e-6)).
  """
  inst_map = np.asarray(inst_map)
  if inst_map.size == 0 or inst_map.max() <= 0:
    return {}
  ids = inst_map.ravel().astype(np.int64)
  n = int(ids.max()) + 1
  fg = ids > 0
  table = instances.instance_table(inst_map, type_map)  # Areas and the type vote.
  row = np.zeros(n, np.int64)
  row[table['ids']] = np.arange(table['ids'].size)
  rows, cols = np.indices(inst_map.shape)
  sum_x = np.bincount(ids[fg], weights=cols.ravel()[fg], minlength=n)
  sum_y = np.bincount(ids[fg], weights=rows.ravel()[fg], minlength=n)
  info = {}
  for idx, sl in enumerate(ndimage.find_objects(inst_map.astype(np.int32)), start=1):
    if sl is None:
      continue
    rmin, rmax, cmin, cmax = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
    crop = (inst_map[sl] == idx).astype(np.uint8)
    contours, _ = cv2.findContours(crop, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
    contour = np.squeeze(contours[0].astype(np.int32))
    if contour.ndim != 2 or contour.shape[0] < 3:
      continue
    contour = contour + np.array([cmin, rmin], np.int32)
    # Centroid as cv2.moments of the crop (m10/m00, m01/m00) plus the crop offset.
    k = row[idx]
    a = table['area'][k]
    centroid = np.array([(sum_x[idx] - cmin * a) / a + cmin, (sum_y[idx] - rmin * a) / a + rmin])
    inst_type = int(table['type'][k])
    info[idx] = {
        'bbox': np.array([[rmin, cmin], [rmax, cmax]], np.int64),
        'centroid': centroid,
        'contour': contour,
        'type': inst_type,
        'type_prob': float(table['counts'][k, inst_type] / (a + 1.0e-6)),
    }
  return info


def process(pred_map: np.ndarray, nr_types: int, params: Params = OFFICIAL,
            ranges: Ranges | None = None) -> tuple[np.ndarray, dict[int, dict[str, Any]]]:
  """Full post-processing of a stitched tile (docs/hovernet.md §4).

  Args:
    pred_map: [H, W, 4] float32, channels [tp, np, h, v]: tp = argmax of softmax(TP) as a float,
      np = softmax(NP)[..., 1], h and v the raw HV channels (x, y).
    nr_types: number of type classes including background (5 for merged CoNSeP).
    params: thresholds and sizes of `separate_instances` (official by default).
    ranges: image-wide ranges when `pred_map` is a part of an image (`sobel_edges`).

  Returns:
    (inst_map [H, W] int32, inst_info) with inst_info as in `instance_info`.

  Raises:
    ValueError: on a wrong shape, non-finite values, or tp values that are not integers in
      [0, nr_types).
  """
  pred_map = np.asarray(pred_map)
  if pred_map.ndim != 3 or pred_map.shape[-1] != 4:
    raise ValueError(f'pred_map must be [H, W, 4] = [tp, np, h, v]; got shape {pred_map.shape}')
  if not np.all(np.isfinite(pred_map)):
    raise ValueError('pred_map has non-finite values')
  tp = pred_map[..., 0]
  if np.any(tp != np.round(tp)) or np.any(tp < 0) or np.any(tp >= nr_types):
    raise ValueError(f'pred_map[..., 0] (tp) must hold integer type ids in [0, {nr_types})')
  inst_map = separate_instances(pred_map[..., 1], pred_map[..., 2], pred_map[..., 3], params, ranges)
  return inst_map, instance_info(inst_map, tp.astype(np.int64))


def to_record(inst_map: np.ndarray, inst_info: dict[int, dict[str, Any]]) -> dict[str, np.ndarray]:
  """Arrays of the official tile `.mat` output (docs/hovernet.md §4.2 "Tile outputs").

  Args:
    inst_map: [H, W] integer instance map from `process`.
    inst_info: the info dict from `process`.

  Returns:
    Dict with `inst_map` [H, W] int32, `inst_uid` [N] int32 (ids listed in inst_info, ascending),
    `inst_type` [N] int32 and `inst_centroid` [N, 2] float64 (x, y), row i describing inst_uid[i].
  """
  uids = sorted(inst_info)
  return {
      'inst_map': np.asarray(inst_map, np.int32),
      'inst_uid': np.array(uids, np.int32),
      'inst_type': np.array([inst_info[i]['type'] for i in uids], np.int32),
      'inst_centroid': np.array([inst_info[i]['centroid'] for i in uids],
                                np.float64).reshape(len(uids), 2),
  }
