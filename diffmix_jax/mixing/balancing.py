"""Balancing maps (NumPy only): rare nuclei pasted over common ones (docs/method.md §2.2, §2.4).

Each tile's draws come from `SeedSequence(seed, spawn_key=(tile_index, 0))` (F8). Ports: paste box
on the half-to-even rounded centroid (F3), only the target's own pixels cleared (F4), `overwrite` or
`clip` pastes (F5), largest 4-connected piece kept of every changed id (F6), clipped at the tile
edge (F7), provenance of every replacement recorded (F10).
"""

import dataclasses
import math
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage

from diffmix_jax.mixing import tiles as tiles_lib
from diffmix_jax.mixing.tiles import Tile

PASTE_MODES = ('overwrite', 'clip')  # §2.4 F5.


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


def rare_donors(tiles: Sequence[Tile], params: BalanceParams) -> list[np.ndarray]:
  """Eligible rare ids of every tile, ascending (the donor lists of §2.2 step 3)."""
  out = []
  for t in tiles:
    ok = tiles_lib.eligible(t, params.border_margin) & np.isin(t.classes, params.rare_classes)
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


def _targets_and_pool(tiles: Sequence[Tile], index: int, params: BalanceParams,
                      donors: list[np.ndarray], rng: np.random.Generator) -> tuple:
  """Targets in paste order and the donor pool of `tiles[index]` (§2.2 steps 2-3, F8).

  Returns:
    (targets int64 [k] ascending area, k, pool_tile int64 [D], pool_id int64 [D], pool_needed
    float64 [D] = area_ratio * donor area): own rare nuclei first, then the other tiles in
    permuted order.
  """
  tile = tiles[index]
  # Targets: eligible commons, class by class in config order, ascending id (§2.2 step 2).
  elig = tiles_lib.eligible(tile, params.border_margin)
  cands = np.concatenate([np.flatnonzero(elig & (tile.classes == c)) for c in params.common_classes]
                         + [np.zeros(0, np.int64)])
  k = math.floor(params.target_fraction * len(cands))
  draw = rng.choice(cands, k, replace=False)  # F8 (a).
  others = rng.permutation(np.array([i for i in range(len(tiles)) if i != index], np.int64))  # (b)
  targets = draw[np.argsort(tile.areas[draw], kind='stable')]
  order = [index] + list(others)
  pool_tile = np.concatenate([np.full(len(donors[t]), t, np.int64) for t in order])
  pool_id = np.concatenate([donors[t] for t in order]).astype(np.int64)
  pool_area = np.array([tiles[t].areas[i] for t, i in zip(pool_tile, pool_id)], np.float64)
  return targets, k, pool_tile, pool_id, params.area_ratio * pool_area


def _dilated_area(inst: np.ndarray, box, j: int, iterations: int) -> int:
  """Pixels of id j's mask dilated by `iterations` crosses (§2.2 step 4.1), on its padded box."""
  r0, c0, r1, c1 = (int(v) for v in box)
  h, w = inst.shape
  mask = inst[max(r0 - iterations, 0):min(r1 + iterations, h),
              max(c0 - iterations, 0):min(c1 + iterations, w)] == j
  if iterations > 0:
    mask = ndimage.binary_dilation(mask, tiles_lib.CROSS, iterations=iterations)
  return int(np.count_nonzero(mask))


def _paste(out: np.ndarray, tile: Tile, j: int, donor: Tile, di: int, paste_mode: str,
           victims: set) -> tuple:
  """Replaces target j of `out` (in place) by donor nucleus di (§2.2 steps 4.4-4.5, F3-F5, F7).

  Returns:
    (top, left, h, w) of the unclipped paste box and the clipped window (row0, col0, row1, col1),
    or None when the box misses the tile. Ids covered by an `overwrite` paste join `victims`.
  """
  d0, e0, d1, e1 = (int(v) for v in donor.boxes[di])
  dmask = donor.inst_map[d0:d1, e0:e1] == di
  h, w = dmask.shape
  # F4: clear only the pixels that still carry j.
  r0, c0, r1, c1 = (int(v) for v in tile.boxes[j])
  win = out[r0:r1, c0:c1]
  win[win == j] = 0
  # Paste (§2.2 step 4.5, F3): box centre on the half-to-even rounded target centroid.
  x_j, y_j = tile.centroids[j]
  top = math.floor(float(np.round(y_j)) - h / 2)
  left = math.floor(float(np.round(x_j)) - w / 2)
  clipped = _clip_box(top, left, h, w, out.shape)
  if clipped is None:
    return (top, left, h, w), None
  dst, src = clipped
  region, m = out[dst], dmask[src]
  if paste_mode == 'overwrite':
    hit = np.unique(region[m])
    victims.update(int(v) for v in hit if v and v != j)
    region[m] = j
  else:  # clip (F5): only into pixels that are background now (j's own were just cleared).
    region[m & (region == 0)] = j
  return (top, left, h, w), (dst[0].start, dst[1].start, dst[0].stop, dst[1].stop)


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
  rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index, 0)))
  targets, k, pool_tile, pool_id, pool_needed = _targets_and_pool(tiles, index, params, donors, rng)
  used = np.zeros(len(pool_id), bool)
  out = tile.inst_map.copy()
  classes = tile.classes.copy()
  rows, windows, victims = [], {}, set()
  for j in targets:
    if params.max_replacements_per_tile is not None and len(rows) >= params.max_replacements_per_tile:
      break
    a_j = _dilated_area(tile.inst_map, tile.boxes[j], j, params.dilation_iterations)
    hits = np.flatnonzero(~used & (pool_needed <= a_j))  # §2.2 step 4.2: first fitting donor.
    if not hits.size:
      continue
    p = int(hits[0])
    used[p] = True
    dt, di = int(pool_tile[p]), int(pool_id[p])
    donor = tiles[dt]
    classes[j] = donor.classes[di]
    box, window = _paste(out, tile, j, donor, di, params.paste_mode, victims)
    if window is not None:
      windows[j] = window
    rows.append((j, dt, di, tile.classes[j], donor.classes[di], *box, a_j, int(donor.areas[di])))
  return _result(tile, out, classes, rows, windows, victims, k)


def _result(tile: Tile, out: np.ndarray, classes: np.ndarray, rows: list, windows: dict,
            victims: set, k: int) -> BalanceResult:
  """F6 on every id whose pixels changed (pasted ids, the nuclei they covered); then the tables."""
  replaced = {r[0] for r in rows}
  boxes = {}
  for i in replaced | victims:
    b = tuple(int(v) for v in tile.boxes[i])
    if i in windows:
      w = windows[i]
      b = (min(b[0], w[0]), min(b[1], w[1]), max(b[2], w[2]), max(b[3], w[3]))
    boxes[i] = b
  tiles_lib.keep_largest_component(out, sorted(boxes), boxes)
  areas, centroids, _ = tiles_lib.id_tables(out, len(classes) - 1)
  ids = np.flatnonzero(areas[1:]) + 1
  cols = ('target_id', 'donor_tile', 'donor_id', 'original_class', 'donor_class', 'box_top',
          'box_left', 'box_h', 'box_w', 'target_dilated_area', 'donor_area')
  table = np.array(rows, np.int64).reshape(len(rows), len(cols))
  provenance = {c: table[:, n] for n, c in enumerate(cols)}
  provenance['present'] = (areas[table[:, 0]] > 0).astype(np.int64)
  return BalanceResult(tile.name, out, classes[out].astype(np.int32), ids.astype(np.int32),
                       classes[ids].astype(np.int32), centroids[ids], provenance, int(k),
                       np.array(sorted(victims - replaced), np.int32))


def balance_all(tiles: Sequence[Tile], params: BalanceParams, seed: int,
                num_workers: int = 0) -> list[BalanceResult]:
  """Balancing maps of all tiles (in the order of `tiles`, which must be tile-name order)."""
  donors = rare_donors(tiles, params)
  return tiles_lib.map_tiles(lambda i: balance_tile(tiles, i, params, seed, donors), len(tiles),
                             num_workers)
