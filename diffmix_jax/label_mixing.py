"""DiffMix virtual label maps (NumPy only): balancing by rare-nucleus pastes and enlarging by moves.

Balancing is diffmix_method.md §2.2 with the port changes of §2.4 (F3-F10); enlarging is §3.2-§3.3.
Every random draw comes from a NumPy Generator seeded per tile (balancing) or per grid patch
(enlarging) from `SeedSequence(seed, spawn_key=...)`, so outputs never depend on the order or the
parallelism in which tiles are processed. Per-nucleus work is done on bounding-box windows.
"""

import concurrent.futures
import dataclasses
import math
import re
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage

_CROSS = ndimage.generate_binary_structure(2, 1)  # 4-connected cross (§2.2 step 4.1, F6).
PASTE_MODES = ('overwrite', 'clip')  # §2.4 F5.
COLLISIONS = ('overwrite', 'reject')  # §3.3.
PRESETS = ('recovered', 'author_issue3')  # §3.3.


@dataclasses.dataclass(frozen=True)
class BalanceParams:
  """Balancing parameters (§2.4); built from `config.mix.balance` by `mix_labels.balance_params`."""
  rare_classes: tuple[int, ...] = (1,)
  common_classes: tuple[int, ...] = (2, 3, 4)
  target_fraction: float = 0.8
  area_ratio: float = 2.3
  dilation_iterations: int = 2
  border_margin: float = 30.0
  paste_mode: str = 'overwrite'
  max_replacements_per_tile: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class EnlargeParams:
  """Enlarging parameters after the preset is applied (§3.3), plus the patch grid (§4.1)."""
  frame_margin: int = 32
  axis_probability: float = 0.3
  shift_low: int = -15
  shift_high: int = 14
  collision: str = 'overwrite'
  patch_size: int = 256
  stride: int = 76


@dataclasses.dataclass
class Tile:
  """Real labels of one tile with per-id tables (index = instance id, row 0 = background)."""
  name: str
  inst_map: np.ndarray  # int32 [H, W], ids 1..N (gaps allowed).
  classes: np.ndarray  # int32 [N + 1], merged class per id.
  areas: np.ndarray  # int64 [N + 1], pixel count per id.
  centroids: np.ndarray  # float64 [N + 1, 2], (x, y) per id; NaN for absent ids.
  boxes: np.ndarray  # int64 [N + 1, 4], (row0, col0, row1, col1) exclusive; zeros if absent.


def natural_key(name: str) -> list:
  """Sort key that orders train_2 before train_10 (the pipeline's tile-name order)."""
  return [int(s) if s.isdigit() else s for s in re.split(r'(\d+)', name)]


def id_tables(inst_map: np.ndarray, num_ids: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per-id areas, centres of mass and bounding boxes of an instance map.

  Args:
    inst_map: int [H, W], 0 = background.
    num_ids: minimum N of the tables.

  Returns:
    areas int64 [N + 1], centroids float64 [N + 1, 2] as (x, y) (NaN where absent), boxes int64
    [N + 1, 4] as (row0, col0, row1, col1) with exclusive ends; N = max(inst_map.max(), num_ids).
  """
  h, w = inst_map.shape
  n = max(int(inst_map.max(initial=0)), num_ids)
  flat = inst_map.ravel()
  areas = np.bincount(flat, minlength=n + 1)
  ys = np.bincount(flat, weights=np.repeat(np.arange(h, dtype=np.float64), w), minlength=n + 1)
  xs = np.bincount(flat, weights=np.tile(np.arange(w, dtype=np.float64), h), minlength=n + 1)
  with np.errstate(invalid='ignore', divide='ignore'):
    centroids = np.stack([xs / areas, ys / areas], axis=1)
  centroids[areas == 0] = np.nan
  centroids[0] = np.nan
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
    A `Tile`; an id's class is the majority class over its pixels.
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
  counts = np.bincount(inst.ravel().astype(np.int64) * num_classes + types.ravel(),
                       minlength=(n + 1) * num_classes).reshape(n + 1, num_classes)
  classes = (np.argmax(counts[:, 1:], axis=1) + 1).astype(np.int32)
  classes[areas == 0] = 0
  classes[0] = 0
  if np.any((areas[1:] > 0) & (counts[1:, 1:].sum(axis=1) == 0)):
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


def rare_donors(tiles: Sequence[Tile], params: BalanceParams) -> list[np.ndarray]:
  """Eligible rare ids of every tile, ascending (the donor lists of §2.2 step 3)."""
  out = []
  for t in tiles:
    ok = eligible(t, params.border_margin) & np.isin(t.classes, params.rare_classes)
    out.append(np.flatnonzero(ok))
  return out


@dataclasses.dataclass
class BalanceResult:
  """Balancing map of one tile (§2.5, F10)."""
  name: str
  inst_map: np.ndarray  # int32 [H, W]; ids are a subset of the real ids.
  type_map: np.ndarray  # int32 [H, W]; 0 exactly where inst_map is 0.
  ids: np.ndarray  # int32 [M], present ids ascending.
  inst_type: np.ndarray  # int32 [M], class of each present id.
  inst_centroid: np.ndarray  # float64 [M, 2], recomputed (x, y) centres of mass.
  provenance: dict  # name -> [R] arrays, one row per replacement in processing order.
  num_targets: int
  touched: np.ndarray  # int32 [K], non-replaced ids that lost pixels to a paste, ascending.


def _clip_box(top, left, h, w, shape):
  """Intersection of a box with the tile: (dest slices, source slices) or None when empty (F7)."""
  r0, c0 = max(top, 0), max(left, 0)
  r1, c1 = min(top + h, shape[0]), min(left + w, shape[1])
  if r0 >= r1 or c0 >= c1:
    return None
  return ((slice(r0, r1), slice(c0, c1)), (slice(r0 - top, r1 - top), slice(c0 - left, c1 - left)))


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
    lab, n = ndimage.label(win == i, _CROSS)
    if n > 1:
      keep = int(np.argmax(np.bincount(lab.ravel())[1:])) + 1
      win[(lab > 0) & (lab != keep)] = 0


def balance_tile(tiles: Sequence[Tile], index: int, params: BalanceParams, seed: int,
                 donors: Optional[list[np.ndarray]] = None) -> BalanceResult:
  """Balancing map of `tiles[index]` (§2.2 with §2.4 F3-F10).

  Args:
    tiles: all training tiles in tile-name order (`natural_key`); `index` is the F8 tile_index.
    index: the target tile.
    params: balancing parameters.
    seed: master seed; the tile's Generator is SeedSequence(seed, spawn_key=(index, 0)).
    donors: `rare_donors(tiles, params)`, computed here when None.

  Returns:
    A `BalanceResult`. Provenance columns (int64 [R]): target_id, donor_tile (index into tiles),
    donor_id, original_class, donor_class, box_top, box_left, box_h, box_w (unclipped paste box),
    target_dilated_area, donor_area, present (id still in the map after F6).
  """
  if donors is None:
    donors = rare_donors(tiles, params)
  tile = tiles[index]
  inst0, shape = tile.inst_map, tile.inst_map.shape
  rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index, 0)))
  # Targets: eligible commons, class by class in config order, ascending id (§2.2 step 2).
  elig = eligible(tile, params.border_margin)
  cands = np.concatenate([np.flatnonzero(elig & (tile.classes == c)) for c in params.common_classes]
                         + [np.zeros(0, np.int64)])
  k = math.floor(params.target_fraction * len(cands))
  draw = rng.choice(cands, k, replace=False)  # F8 (a).
  others = rng.permutation(np.array([i for i in range(len(tiles)) if i != index], np.int64))  # (b)
  targets = draw[np.argsort(tile.areas[draw], kind='stable')]
  # Donor pool (§2.2 step 3): own rare nuclei first, then the other tiles in permuted order.
  order = [index] + list(others)
  pool_tile = np.concatenate([np.full(len(donors[t]), t, np.int64) for t in order])
  pool_id = np.concatenate([donors[t] for t in order]).astype(np.int64)
  pool_area = np.array([tiles[t].areas[i] for t, i in zip(pool_tile, pool_id)], np.float64)
  pool_needed = params.area_ratio * pool_area
  used = np.zeros(len(pool_id), bool)

  out = inst0.copy()
  classes = tile.classes.copy()
  rows, windows, victims = [], {}, set()
  it = params.dilation_iterations
  for j in targets:
    if params.max_replacements_per_tile is not None and len(rows) >= params.max_replacements_per_tile:
      break
    r0, c0, r1, c1 = (int(v) for v in tile.boxes[j])
    # Dilated area of the real target mask (§2.2 step 4.1), on a window padded by `it` px.
    w0, w1 = (max(r0 - it, 0), max(c0 - it, 0)), (min(r1 + it, shape[0]), min(c1 + it, shape[1]))
    mask = inst0[w0[0]:w1[0], w0[1]:w1[1]] == j
    if it > 0:
      mask = ndimage.binary_dilation(mask, _CROSS, iterations=it)
    a_j = int(np.count_nonzero(mask))
    hits = np.flatnonzero(~used & (pool_needed <= a_j))  # §2.2 step 4.2: first fitting donor.
    if not hits.size:
      continue
    p = int(hits[0])
    used[p] = True
    dt, di = int(pool_tile[p]), int(pool_id[p])
    donor = tiles[dt]
    d0, e0, d1, e1 = (int(v) for v in donor.boxes[di])
    dmask = donor.inst_map[d0:d1, e0:e1] == di
    h, w = dmask.shape
    classes[j] = donor.classes[di]
    # F4: clear only the pixels that still carry j.
    win = out[r0:r1, c0:c1]
    win[win == j] = 0
    # Paste (§2.2 step 4.5, F3): box centre on the half-to-even rounded target centroid.
    x_j, y_j = tile.centroids[j]
    top = math.floor(float(np.round(y_j)) - h / 2)
    left = math.floor(float(np.round(x_j)) - w / 2)
    clipped = _clip_box(top, left, h, w, shape)
    if clipped is not None:
      dst, src = clipped
      region, m = out[dst], dmask[src]
      if params.paste_mode == 'overwrite':
        hit = np.unique(region[m])
        victims.update(int(v) for v in hit if v and v != j)
        region[m] = j
      else:  # clip (F5): only into pixels that are background now (j's own were just cleared).
        region[m & (region == 0)] = j
      windows[j] = (dst[0].start, dst[1].start, dst[0].stop, dst[1].stop)
    rows.append((j, dt, di, tile.classes[j], donor.classes[di], top, left, h, w, a_j,
                 int(donor.areas[di])))

  # F6 on every id whose pixels changed: pasted ids and the nuclei they covered.
  replaced = {r[0] for r in rows}
  boxes = {}
  for i in replaced | victims:
    b = tuple(int(v) for v in tile.boxes[i])
    if i in windows:
      w = windows[i]
      b = (min(b[0], w[0]), min(b[1], w[1]), max(b[2], w[2]), max(b[3], w[3]))
    boxes[i] = b
  keep_largest_component(out, sorted(boxes), boxes)

  areas, centroids, _ = id_tables(out, len(classes) - 1)
  ids = np.flatnonzero(areas[1:]) + 1
  type_map = classes[out]
  cols = ('target_id', 'donor_tile', 'donor_id', 'original_class', 'donor_class', 'box_top',
          'box_left', 'box_h', 'box_w', 'target_dilated_area', 'donor_area')
  table = np.array(rows, np.int64).reshape(len(rows), len(cols))
  provenance = {c: table[:, n] for n, c in enumerate(cols)}
  provenance['present'] = (areas[table[:, 0]] > 0).astype(np.int64)
  return BalanceResult(tile.name, out, type_map.astype(np.int32), ids.astype(np.int32),
                       classes[ids].astype(np.int32), centroids[ids], provenance, int(k),
                       np.array(sorted(victims - replaced), np.int32))


def _map_tiles(fn, n: int, num_workers: int) -> list:
  """[fn(0), ..., fn(n - 1)], serially or on a thread pool (results are order-independent)."""
  if num_workers and num_workers > 0 and n > 1:
    with concurrent.futures.ThreadPoolExecutor(num_workers) as ex:
      return list(ex.map(fn, range(n)))
  return [fn(i) for i in range(n)]


def balance_all(tiles: Sequence[Tile], params: BalanceParams, seed: int,
                num_workers: int = 0) -> list[BalanceResult]:
  """Balancing maps of all tiles (in the order of `tiles`, which must be tile-name order)."""
  donors = rare_donors(tiles, params)
  return _map_tiles(lambda i: balance_tile(tiles, i, params, seed, donors), len(tiles), num_workers)


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


@dataclasses.dataclass
class EnlargeResult:
  """Enlarging maps of one tile, one per grid patch (§3.3). Ids are re-mapped per patch to 1..n."""
  name: str
  offsets: np.ndarray  # int32 [P, 2] patch (row, col) in the tile.
  inst_maps: np.ndarray  # int32 [P, S, S] re-mapped ids (a fully covered id leaves a gap).
  classes: np.ndarray  # int32 [P, K]; classes[p, i] = real class of patch id i (0 = background).
  real_ids: np.ndarray  # int32 [P, K]; tile id of patch id i (0 = none).
  moves: dict  # per interior nucleus: patch, id, dy, dx, gate_y, gate_x, moved; int32 [M].
  num_nuclei: np.ndarray  # int32 [P], nuclei in the real patch.
  num_interior: np.ndarray  # int32 [P].
  num_moved: np.ndarray  # int32 [P], interior nuclei written at a nonzero shift.

  def type_maps(self) -> np.ndarray:
    """int32 [P, S, S] class maps rebuilt from per-id classes."""
    return patch_type_maps(self.classes, self.inst_maps)


def patch_type_maps(classes: np.ndarray, inst_maps: np.ndarray) -> np.ndarray:
  """Type maps of stacked patches: int32 [P, S, S] with out[p] = classes[p][inst_maps[p]].

  Args:
    classes: int [P, K] class per patch id (column 0 = background = 0).
    inst_maps: int [P, S, S] patch ids < K.
  """
  flat = inst_maps.reshape(len(inst_maps), 1, int(np.prod(inst_maps.shape[1:])))
  return np.take_along_axis(classes[:, None, :], flat, axis=2).reshape(inst_maps.shape).astype(np.int32)


def enlarge_patch(tile: Tile, row: int, col: int, params: EnlargeParams,
                  rng: np.random.Generator) -> tuple:
  """Enlarging map of one real patch (§3.2 steps 1-3 with the port choices of §3.3).

  Args:
    tile: real tile.
    row, col: patch top-left in the tile.
    params: enlarging parameters.
    rng: the patch's Generator; draws dy (all), dx (all), x-gates, y-gates for interior ids.

  Returns:
    (inst int32 [S, S] re-mapped ids, real_ids int64 [n + 1] tile id per patch id, moves int32
    [m, 7] rows (id, dy, dx, gate_y, gate_x, moved, 0): dy, dx after the gates; moved = written
    at that nonzero shift (a `reject` drop leaves moved = 0)).
  """
  s, fm = params.patch_size, params.frame_margin
  crop = tile.inst_map[row:row + s, col:col + s]
  n_all = len(tile.areas)
  present = np.bincount(crop.ravel(), minlength=n_all) > 0
  present[0] = False
  frame = np.concatenate([crop[:fm].ravel(), crop[s - fm:].ravel(), crop[fm:s - fm, :fm].ravel(),
                          crop[fm:s - fm, s - fm:].ravel()])
  in_frame = np.bincount(frame, minlength=n_all) > 0
  real_ids = np.concatenate([[0], np.flatnonzero(present)])
  lut = np.zeros(n_all, np.int32)
  lut[real_ids[1:]] = np.arange(1, len(real_ids), dtype=np.int32)
  interior = np.flatnonzero(present & ~in_frame)  # ascending id (§3.2 step 2)
  m = len(interior)
  dy = rng.integers(params.shift_low, params.shift_high, size=m, endpoint=True)
  dx = rng.integers(params.shift_low, params.shift_high, size=m, endpoint=True)
  gate_x = rng.random(m) >= 1.0 - params.axis_probability
  gate_y = rng.random(m) >= 1.0 - params.axis_probability
  dy, dx = np.where(gate_y, dy, 0), np.where(gate_x, dx, 0)

  out = np.where(present & ~in_frame, 0, lut)[crop].astype(np.int32)  # border nuclei stay (step 3)
  real = lut[crop] if params.collision == 'reject' else None
  applied = np.zeros(m, bool)
  victims, boxes = set(), {}
  for k, i in enumerate(interior):
    r0, c0, r1, c1 = (int(v) for v in tile.boxes[i] - (row, col, row, col))
    new = int(lut[i])
    mask = crop[r0:r1, c0:c1] == i
    sy, sx = int(dy[k]), int(dx[k])
    if (sy or sx) and params.collision == 'reject':
      dst = (slice(r0 + sy, r1 + sy), slice(c0 + sx, c1 + sx))
      before, now = real[dst][mask], out[dst][mask]
      if np.any((before != 0) & (before != new)) or np.any((now != 0) & (now != new)):
        sy = sx = 0
    applied[k] = (sy, sx) == (int(dy[k]), int(dx[k]))
    region = out[r0 + sy:r1 + sy, c0 + sx:c1 + sx]
    hit = region[mask]
    victims.update(int(v) for v in np.unique(hit[hit != 0]) if v != new)
    region[mask] = new
    boxes[new] = (r0 + sy, c0 + sx, r1 + sy, c1 + sx)
  for v in victims:  # F6 on nuclei that lost pixels to a later write.
    if v not in boxes:
      r0, c0, r1, c1 = (int(x) for x in tile.boxes[real_ids[v]] - (row, col, row, col))
      boxes[v] = (max(r0, 0), max(c0, 0), min(r1, s), min(c1, s))
  keep_largest_component(out, sorted(victims), boxes)
  moves = np.stack([lut[interior], dy, dx, gate_y, gate_x, applied & ((dy != 0) | (dx != 0)),
                    np.zeros(m)], axis=1).astype(np.int32)
  return out, real_ids, moves


def enlarge_tile(tile: Tile, index: int, params: EnlargeParams, seed: int) -> EnlargeResult:
  """Enlarging maps of every grid patch of a tile (§3.3; Generator per (tile, patch) from
  SeedSequence(seed, spawn_key=(index, patch_index, 1))).

  Args:
    tile: real tile.
    index: its tile_index (position in tile-name order).
    params: enlarging parameters and grid.
    seed: master seed.

  Returns:
    An `EnlargeResult` with P = len(grid_offsets(...)) patches.
  """
  h, w = tile.inst_map.shape
  offsets = grid_offsets(h, w, params.patch_size, params.stride)
  insts, ids, moves = [], [], []
  for p, (r, c) in enumerate(offsets):
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index, p, 1)))
    inst, real_ids, mv = enlarge_patch(tile, int(r), int(c), params, rng)
    mv[:, 6] = p
    insts.append(inst)
    ids.append(real_ids)
    moves.append(mv)
  k = max([len(i) for i in ids], default=1)
  real_ids = np.zeros((len(offsets), k), np.int32)
  for p, i in enumerate(ids):
    real_ids[p, :len(i)] = i
  classes = tile.classes[real_ids].astype(np.int32)
  mv = np.concatenate(moves, 0) if moves else np.zeros((0, 7), np.int32)
  table = {'patch': mv[:, 6], 'id': mv[:, 0], 'dy': mv[:, 1], 'dx': mv[:, 2], 'gate_y': mv[:, 3],
           'gate_x': mv[:, 4], 'moved': mv[:, 5]}
  s = params.patch_size
  inst_maps = np.stack(insts) if insts else np.zeros((0, s, s), np.int32)
  p_count = len(offsets)
  return EnlargeResult(
      tile.name, offsets, inst_maps, classes, real_ids, table,
      (real_ids > 0).sum(1).astype(np.int32),
      np.bincount(table['patch'], minlength=p_count).astype(np.int32),
      np.bincount(table['patch'], weights=table['moved'], minlength=p_count).astype(np.int32))


def enlarge_all(tiles: Sequence[Tile], params: EnlargeParams, seed: int,
                num_workers: int = 0) -> list[EnlargeResult]:
  """Enlarging maps of all tiles (in the order of `tiles`, which must be tile-name order)."""
  return _map_tiles(lambda i: enlarge_tile(tiles[i], i, params, seed), len(tiles), num_workers)
