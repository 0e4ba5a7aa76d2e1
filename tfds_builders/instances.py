"""Per-instance tables of a label map (NumPy only): area, centre of mass and type.

The one implementation of "the type of a nucleus" in the project: the most frequent type value over
the instance's pixels, ties to the smaller value, background (0) only when it is the only value (the
official HoVer-Net post-processing vote, docs/hovernet.md §4.2). The builders use it to make raw type maps
constant per instance, diffmix_jax for ground-truth records, post-processing and label mixing. It sits
here, below both packages, because the builders may not import diffmix_jax.
"""

import numpy as np


def instance_table(inst_map: np.ndarray, type_map: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """Per-instance tables of the non-zero ids present in `inst_map`.

  Args:
    inst_map: int [H, W], 0 = background, any non-negative ids.
    type_map: optional int [H, W] of non-negative type values.

  Returns:
    `ids` int32 [N] ascending, `area` int64 [N], `centroid` float64 [N, 2] (x, y) centre of mass;
    with `type_map` also `counts` int64 [N, K] (pixels per type value, K = type_map.max() + 1) and
    `type` int32 [N] (the vote above).
  """
  inst = np.asarray(inst_map)
  flat = inst.ravel().astype(np.int64)
  fg = flat > 0
  top = int(flat.max(initial=0))
  if top <= flat.size:  # Dense ids (the usual 1..N): one pass of bincount, no sort.
    ids = np.flatnonzero(np.bincount(flat[fg], minlength=top + 1))
    lut = np.zeros(top + 1, np.int64)
    lut[ids] = np.arange(ids.size)
    row = lut[flat]
  else:
    ids, row = np.unique(flat, return_inverse=True)
    if ids.size and ids[0] == 0:
      ids, row = ids[1:], row - 1
  n = ids.size
  h, w = inst.shape
  area = np.bincount(row[fg], minlength=n).astype(np.int64)
  ys = np.bincount(row[fg], weights=np.repeat(np.arange(h, dtype=np.float64), w)[fg], minlength=n)
  xs = np.bincount(row[fg], weights=np.tile(np.arange(w, dtype=np.float64), h)[fg], minlength=n)
  out = {'ids': ids.astype(np.int32), 'area': area,
         'centroid': np.stack([xs, ys], axis=1) / np.maximum(area, 1)[:, None]}
  if type_map is not None:
    types = np.asarray(type_map).ravel().astype(np.int64)[fg]
    k = int(types.max(initial=0)) + 1
    counts = np.bincount(row[fg] * k + types, minlength=n * k).reshape(n, k)
    others = counts[:, 1:]
    vote = np.where(others.sum(axis=1) > 0, np.argmax(others, axis=1) + 1, 0) if k > 1 else (
        np.zeros(n, np.int64))
    out.update(counts=counts, type=vote.astype(np.int32))
  return out
