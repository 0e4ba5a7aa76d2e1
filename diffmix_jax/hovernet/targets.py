"""HoVer-Net training targets and mirror-mode patch extraction, in NumPy (docs/hovernet.md §2.4, §6.3, §7).

No JAX here: these run on the host inside the input pipeline.
"""

import math

import numpy as np
from scipy import ndimage

MIN_HV_PIXELS = 30  # Instances with fewer pixels inside the output crop get HV = 0 (docs/differences.md §2.8).
TP_CLASS_WEIGHTINGS = ('none', 'median_frequency')  # config.hovernet.train.tp_class_weighting


def tp_class_weights(sets, nr_types: int, weighting: str) -> np.ndarray | None:
  """Per-class weights of the TP cross-entropy, from the pixel shares of the training data.

  The official loss averages the TP cross-entropy over pixels, so ~90 % of its weight is background
  and a short run learns types in order of pixel share (on the demo, 150 steps learn background and
  epithelial only). 'median_frequency' weights class c by median_k(f_k) / f_c, f_c its pixel share
  in (approximately) what the run trains on (median-frequency balancing, Eigen & Fergus 2015); the
  weighted loss is sum(w_y * CE) / sum(w_y), so equal weights give the official mean. A run that mixes sets (real
  windows and synthetic ones) takes f = sum_k r_k f_k / sum_k r_k, f_k the pixel shares of set k and
  r_k the rows it gives the batches (shares of whole tiles and patches, not of the windows and the
  output crop the loss sees): weights from the real tiles alone would over-weight a class
  the synthetic rows are rich in (the demo's rare class, 1.6 % of the real nuclei).

  Args:
    sets: [(type_maps, rows)]: an iterable of int [H, W] type maps with ids in [0, nr_types) and
      the rows (> 0) of each batch, or of the whole run, drawn from them.
    nr_types: number of type classes including background.
    weighting: one of TP_CLASS_WEIGHTINGS.

  Returns:
    None for 'none' (the official unweighted loss), else float32 [nr_types]; a class absent from
    every set gets weight 1.

  Raises:
    ValueError: for an unknown weighting or a type id outside [0, nr_types).
  """
  if weighting not in TP_CLASS_WEIGHTINGS:
    raise ValueError(f'config.hovernet.train.tp_class_weighting={weighting!r}: expected one of '
                     f'{TP_CLASS_WEIGHTINGS}')
  if weighting == 'none':
    return None
  freq = np.zeros(nr_types, np.float64)
  for type_maps, rows in sets:
    if not rows > 0:
      raise ValueError(f'tp_class_weights: rows must be > 0; got {rows}')
    counts = np.zeros(nr_types, np.int64)
    for i, t in enumerate(type_maps):
      t = np.asarray(t)
      if t.size and (t.min() < 0 or t.max() >= nr_types):
        raise ValueError(f'training type map {i}: ids {t.min()}..{t.max()} outside [0, '
                         f'{nr_types}) (config.hovernet.model.nr_types)')
      counts += np.bincount(t.ravel(), minlength=nr_types)
    if counts.sum():
      freq += rows * counts / counts.sum()
  present = freq > 0
  freq = freq / max(freq.sum(), 1e-12)
  weights = np.ones(nr_types, np.float64)
  weights[present] = np.median(freq[present]) / freq[present]
  return weights.astype(np.float32)


def centre_crop(a: np.ndarray, size: int) -> np.ndarray:
  """Centre crop of the first two axes to size x size, offset int((H - size) / 2) (docs/hovernet.md §2.1).

  Larger-than-input sizes leave that axis unchanged (imgaug's CropToFixedSize never pads).
  """
  h, w = a.shape[:2]
  y0, x0 = max(int((h - size) / 2), 0), max(int((w - size) / 2), 0)
  return a[y0:y0 + size, x0:x0 + size]


def fix_mirror_padding(inst_map: np.ndarray) -> np.ndarray:
  """Splits instances with several 4-connected parts into separate ids (docs/hovernet.md §2.4 step 1).

  For each id in ascending order, part 1 keeps the id and part k >= 2 becomes (current max id + k);
  the max is updated after each id.

  Args:
    inst_map: [H, W] integer instance map, 0 = background.

  Returns:
    [H, W] int32 fixed instance map.
  """
  out = np.asarray(inst_map, np.int32).copy()
  current_max = int(out.max(initial=0))
  for inst_id in np.unique(out):
    if inst_id == 0:
      continue
    parts, n = ndimage.label(out == inst_id)
    if n > 1:
      extra = parts > 1
      out[extra] = parts[extra] + current_max
      current_max = int(out.max())
  return out


def _surviving_ids(inst_map: np.ndarray, crop_shape: tuple[int, int]) -> np.ndarray:
  """Ids with at least MIN_HV_PIXELS pixels inside the centre crop (the "< 30 dropped" rule)."""
  h, w = inst_map.shape
  y0, x0 = int((h - crop_shape[0]) / 2), int((w - crop_shape[1]) / 2)
  crop = inst_map[max(y0, 0):max(y0, 0) + crop_shape[0], max(x0, 0):max(x0, 0) + crop_shape[1]]
  ids, counts = np.unique(crop, return_counts=True)
  return ids[(ids > 0) & (counts >= MIN_HV_PIXELS)]


def _normalise_signed(v: np.ndarray) -> np.ndarray:
  """Negative values divided by |min|, positive by max, each side on its own (docs/hovernet.md §2.4)."""
  v = v.astype(np.float32)
  neg, pos = v < 0, v > 0
  if neg.any():
    v[neg] /= -v[neg].min()
  if pos.any():
    v[pos] /= v[pos].max()
  return v


def hv_map(inst_map: np.ndarray, crop_shape: tuple[int, int] | int) -> np.ndarray:
  """HV regression target at input size (docs/hovernet.md §2.4; docs/differences.md §2.7).

  Args:
    inst_map: [H, W] integer instance map at network input size (after augmentation).
    crop_shape: output crop (O, O) or O; instances with < 30 pixels inside it get HV = 0.

  Returns:
    float32 [H, W, 2], channel 0 = x (horizontal), channel 1 = y (vertical), in [-1, 1], zero on
    background. Centre-crop it to the output size for the loss.
  """
  if isinstance(crop_shape, int):
    crop_shape = (crop_shape, crop_shape)
  fixed = fix_mirror_padding(inst_map)
  h, w = fixed.shape
  x_map = np.zeros((h, w), np.float32)
  y_map = np.zeros((h, w), np.float32)
  objects = ndimage.find_objects(fixed)
  for inst_id in _surviving_ids(fixed, crop_shape):
    rs, cs = objects[inst_id - 1]
    r0, r1, c0, c1 = rs.start - 2, rs.stop + 2, cs.start - 2, cs.stop + 2
    if r0 < 0 or c0 < 0:
      continue  # Border quirk: the reference's negative slice start is empty; no HV values.
    r1, c1 = min(r1, h), min(c1, w)
    mask = fixed[r0:r1, c0:c1] == inst_id
    rows, cols = np.nonzero(mask)
    cy, cx = int(rows.mean() + 0.5), int(cols.mean() + 0.5)
    yy, xx = np.mgrid[1:r1 - r0 + 1, 1:c1 - c0 + 1]
    inst_x = np.where(mask, xx - cx, 0)
    inst_y = np.where(mask, yy - cy, 0)
    x_map[r0:r1, c0:c1][mask] = _normalise_signed(inst_x)[mask]
    y_map[r0:r1, c0:c1][mask] = _normalise_signed(inst_y)[mask]
  return np.stack([x_map, y_map], axis=-1)


def targets(inst_map: np.ndarray, type_map: np.ndarray | None, output_size: int) -> dict:
  """All targets of one augmented patch (docs/hovernet.md §2.1 steps 5-6, §2.4).

  Args:
    inst_map: [I, I] integer instance map at input size.
    type_map: [I, I] integer merged type map at input size, or None (segmentation only).
    output_size: O.

  Returns:
    `np` int32 [O, O] in {0, 1}, `hv` float32 [O, O, 2] (x, y) and, with type_map, `tp` int32 [O, O].
  """
  out = {'np': centre_crop((inst_map > 0).astype(np.int32), output_size),
         'hv': centre_crop(hv_map(inst_map, output_size), output_size)}
  if type_map is not None:
    out['tp'] = centre_crop(np.asarray(type_map, np.int32), output_size)
  return out


def _window_starts(length: int, window: int, step: int) -> tuple[list[int], int | None]:
  """Regular starts 0, step, ... while the window fits, and the flush start if a remainder is left."""
  if length < window:
    raise ValueError(f'array side {length} is smaller than the window {window}')
  starts = list(range(0, length - window + 1, step))
  extra = length - window if (length - window) % step else None
  return starts, extra


def patch_offsets(shape: tuple[int, int], window: int, step: int) -> list[tuple[int, int]]:
  """Top-left corners of valid windows in the official order (docs/hovernet.md §6.3).

  Regular grid row-major, then the bottom row (flush with the bottom edge), then the right column
  (flush right), then the bottom-right corner.
  """
  rows, extra_r = _window_starts(shape[0], window, step)
  cols, extra_c = _window_starts(shape[1], window, step)
  out = [(r, c) for r in rows for c in cols]
  if extra_r is not None:
    out += [(extra_r, c) for c in cols]
  if extra_c is not None:
    out += [(r, extra_c) for r in rows]
  if extra_r is not None and extra_c is not None:
    out.append((extra_r, extra_c))
  return out


def mirror_pad(a: np.ndarray, window: int, step: int) -> np.ndarray:
  """Reflect-pads the first two axes by (window - step) / 2 per side (np.pad 'reflect', §6.3)."""
  pad = (window - step) // 2
  return np.pad(a, [(pad, pad), (pad, pad)] + [(0, 0)] * (a.ndim - 2), mode='reflect')


def extract_patches(a: np.ndarray, window: int = 540, step: int = 164) -> np.ndarray:
  """Mirror-mode training patches of one tile (docs/hovernet.md §6.3): 49 per 1000^2 tile at 540/164.

  Args:
    a: [H, W, C] tile (e.g. RGB + inst + type, as the official int32 [H, W, 5]).
    window: patch side.
    step: stride.

  Returns:
    [P, window, window, C] patches, same dtype, in the official order.
  """
  padded = mirror_pad(a, window, step)
  return np.stack([padded[r:r + window, c:c + window]
                   for r, c in patch_offsets(padded.shape[:2], window, step)])


def tile_geometry(length: int, input_size: int, output_size: int) -> dict:
  """Tiled-inference geometry for a side of `length` pixels (docs/hovernet.md §7).

  Returns:
    dict with `n` steps per axis, `last` = n * output, `pad_before` = (input - output) / 2 and
    `pad_after` = last + input - length (the reference pads more than the windows need).
  """
  n = math.ceil((length - output_size) / output_size) + 1
  last = n * output_size
  pad_before = (input_size - output_size) // 2
  pad_after = last + input_size - length
  return {'n': n, 'last': last, 'pad_before': pad_before, 'pad_after': pad_after}
