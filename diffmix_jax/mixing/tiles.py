"""Per-id tables of a real tile, the patch grid and helpers shared by balancing and enlarging.

NumPy only. Every mixing draw comes from a Generator seeded per tile or per grid patch from
`SeedSequence(seed, spawn_key=...)`, so outputs never depend on the order or the parallelism in
which tiles are processed (`map_tiles`). Per-nucleus work is done on bounding-box windows.
"""

import concurrent.futures
import dataclasses
from typing import Optional

import numpy as np
from scipy import ndimage

from tfds_builders import instances

CROSS = ndimage.generate_binary_structure(2, 1)  # 4-connected cross (§2.2 step 4.1, F6).

@dataclasses.dataclass
class Tile:
  """Real labels of one tile with per-id tables (index = instance id, row 0 = background)."""
  name: str
  inst_map: np.ndarray  # int32 [H, W], ids 1..N (gaps allowed).
  classes: np.ndarray  # int32 [N + 1], merged class per id.
  areas: np.ndarray  # int64 [N + 1], pixel count per id.
  centroids: np.ndarray  # float64 [N + 1, 2], (x, y) per id; NaN for absent ids.
  boxes: np.ndarray  # int64 [N + 1, 4], (row0, col0, row1, col1) exclusive; zeros if absent.


def id_tables(inst_map: np.ndarray, num_ids: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per-id areas, centres of mass and bounding boxes of an instance map.

  Args:
    inst_map: int [H, W], 0 = background.
    num_ids: minimum N of the tables.

  Returns:
    areas int64 [N + 1], centroids float64 [N + 1, 2] as (x, y) (NaN where absent), boxes int64
    [N + 1, 4] as (row0, col0, row1, col1) with exclusive ends; N = max(inst_map.max(), num_ids).
  """
  n = max(int(inst_map.max(initial=0)), num_ids)
  table = instances.instance_table(inst_map)
  areas = np.zeros(n + 1, np.int64)
  areas[table['ids']] = table['area']
  areas[0] = np.count_nonzero(inst_map == 0)
  centroids = np.full((n + 1, 2), np.nan)
  centroids[table['ids']] = table['centroid']
  boxes = np.zeros((n + 1, 4), np.int64)
  for i, sl in enumerate(ndimage.find_objects(inst_map), start=1):
    if sl is not None:
      boxes[i] = (sl[0].start, sl[1].start, sl[0].stop, sl[1].stop)
  return areas, centroids, boxes


def prepare_tile(name: str, inst_map: np.ndarray, type_map: np.ndarray, num_classes: int,
                 inst_centroid: Optional[np.ndarray] = None) -> Tile:
  """Builds the per-id tables of a real tile (§2.2 inputs; centroids per §2.4 F3).

  Args:
    name: tile stem.
    inst_map: int [H, W] instance ids.
    type_map: int [H, W] merged classes in 0..num_classes-1.
    num_classes: classes incl. background.
    inst_centroid: optional float [N, 2] stored (x, y) centroids of ids 1..N; else centre of mass.

  Returns:
    A `Tile`; an id's class is the vote of `instances.instance_table` over its pixels.
  """
  inst = np.ascontiguousarray(inst_map, dtype=np.int32)
  types = np.asarray(type_map).astype(np.int64)
  if inst.shape != types.shape or inst.ndim != 2:
    raise ValueError(f'tile {name}: inst_map {inst.shape} and type_map {types.shape} must be equal 2-D')
  if inst.min(initial=0) < 0 or types.min(initial=0) < 0 or types.max(initial=0) >= num_classes:
    raise ValueError(f'tile {name}: type_map values must be in 0..{num_classes - 1} and ids >= 0')
  areas, centroids, boxes = id_tables(inst)
  centroids[0] = np.nan
  n = len(areas) - 1
  table = instances.instance_table(inst, types)
  classes = np.zeros(n + 1, np.int32)
  classes[table['ids']] = table['type']
  if np.any(table['type'] == 0):
    raise ValueError(f'tile {name}: a nucleus has type 0 on all its pixels (type_map > 0 must '
                     f'hold wherever inst_map > 0)')
  if inst_centroid is not None:
    stored = np.asarray(inst_centroid, np.float64).reshape(-1, 2)
    if len(stored) == n:
      centroids[1:] = np.where(areas[1:, None] > 0, stored, np.nan)
  return Tile(name, inst, classes, areas, centroids, boxes)


def eligible(tile: Tile, margin: float) -> np.ndarray:
  """bool [N + 1]: present ids whose centroid is >= margin px from every tile edge (§2.2 step 1)."""
  h, w = tile.inst_map.shape
  x, y = tile.centroids[:, 0], tile.centroids[:, 1]
  with np.errstate(invalid='ignore'):
    ok = (tile.areas > 0) & (x >= margin) & (x <= w - margin) & (y >= margin) & (y <= h - margin)
  ok[0] = False
  return ok


def keep_largest_component(inst: np.ndarray, ids, boxes: dict) -> None:
  """F6 in place: each listed id keeps its largest 4-connected component (ties: first in raster order).

  Args:
    inst: int32 [H, W] map, edited in place.
    ids: ids to clean.
    boxes: id -> (row0, col0, row1, col1) window that holds all of the id's pixels.
  """
  for i in ids:
    r0, c0, r1, c1 = boxes[i]
    win = inst[r0:r1, c0:c1]
    lab, n = ndimage.label(win == i, CROSS)
    if n > 1:
      keep = int(np.argmax(np.bincount(lab.ravel())[1:])) + 1
      win[(lab > 0) & (lab != keep)] = 0


def map_tiles(fn, n: int, num_workers: int) -> list:
  """[fn(0), ..., fn(n - 1)], serially or on a thread pool (results are order-independent)."""
  if num_workers and num_workers > 0 and n > 1:
    with concurrent.futures.ThreadPoolExecutor(num_workers) as ex:
      return list(ex.map(fn, range(n)))
  return [fn(i) for i in range(n)]


def grid_offsets(height: int, width: int, patch_size: int, stride: int) -> np.ndarray:
  """Top-left corners of the patch grid (§4.1): range(0, L - patch + 1, stride) per axis.

  Args:
    height, width: tile size.
    patch_size: patch side (256).
    stride: grid step (76).

  Returns:
    int32 [P, 2] (row, col) in row-major order; P = 0 for a tile smaller than the patch.
  """
  rs = np.arange(0, height - patch_size + 1, stride)
  cs = np.arange(0, width - patch_size + 1, stride)
  return np.stack(np.meshgrid(rs, cs, indexing='ij'), -1).reshape(-1, 2).astype(np.int32)


def covering_offsets(boxes: np.ndarray, height: int, width: int, patch_size: int,
                     stride: int) -> tuple[np.ndarray, np.ndarray]:
  """Few patches that together hold every box whole: a greedy set cover over candidate positions.

  Candidates are the grid range(0, L - patch + 1, stride) per axis with the last position L - patch
  added, and for each box that no grid patch holds, the patch centred on it (clipped to the tile),
  so every box no larger than the patch can be held. Each pick takes the candidate holding the most
  boxes not yet held; ties go to the candidate whose newly held boxes lie closest to its centre
  (sum of squared distances), then to the first in row-major order.

  Args:
    boxes: int [N, 4] (row0, col0, row1, col1), exclusive ends.
    height, width: tile size.
    patch_size: patch side.
    stride: grid step of the candidates in px.

  Returns:
    offsets int32 [P, 2] (row, col) of the picked patches in row-major order, and held bool [N]
    (False exactly for a box larger than the patch, or every box when the tile is smaller).
  """
  boxes = np.asarray(boxes, np.int64).reshape(-1, 4)
  held = np.zeros(len(boxes), bool)
  if height < patch_size or width < patch_size or not len(boxes):
    return np.zeros((0, 2), np.int32), held
  axes = [np.unique(np.append(np.arange(0, n - patch_size + 1, stride), n - patch_size))
          for n in (height, width)]
  grid = np.stack(np.meshgrid(*axes, indexing='ij'), -1).reshape(-1, 2)
  extent = boxes[:, 2:] - boxes[:, :2]
  centred = np.clip(boxes[:, :2] - (patch_size - extent) // 2, 0,
                    np.array([height, width]) - patch_size)
  unheld = ~_holds(grid, boxes, patch_size).any(0)
  cand = np.unique(np.concatenate([grid, centred[unheld]]), axis=0)  # [C, 2], row-major order.
  fits = _holds(cand, boxes, patch_size)  # [C, N]
  r, c = cand[:, None, 0], cand[:, None, 1]
  centre = (boxes[:, :2] + boxes[:, 2:]) / 2.0
  dist = ((centre[None, :, 0] - r - patch_size / 2) ** 2 +
          (centre[None, :, 1] - c - patch_size / 2) ** 2)  # [C, N]
  picked = []
  while True:
    open_ = fits & ~held
    counts = open_.sum(1)
    if counts.max() == 0:
      break
    best = np.flatnonzero(counts == counts.max())
    k = best[np.argmin(np.where(open_[best], dist[best], 0.0).sum(1))]
    picked.append(k)
    held |= fits[k]
  order = np.sort(np.array(picked, np.int64))
  return cand[order].astype(np.int32).reshape(-1, 2), held


def _holds(offsets: np.ndarray, boxes: np.ndarray, patch_size: int) -> np.ndarray:
  """bool [C, N]: patch c at offsets [C, 2] holds box n of boxes [N, 4] (exclusive ends) whole."""
  r, c = offsets[:, None, 0], offsets[:, None, 1]
  return ((r <= boxes[:, 0]) & (r + patch_size >= boxes[:, 2]) &
          (c <= boxes[:, 1]) & (c + patch_size >= boxes[:, 3]))
