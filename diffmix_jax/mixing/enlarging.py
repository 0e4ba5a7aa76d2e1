"""Enlarging maps (NumPy only): interior nuclei of each grid patch moved (docs/method.md §3.2-3.3).

Each patch's draws come from `SeedSequence(seed, spawn_key=(tile_index, patch_index, 1))`; nuclei
touching the patch's frame stay, the others move by gated random shifts, with `overwrite` or
`reject` collisions, and every nucleus that lost pixels keeps its largest 4-connected piece (F6).
"""

import dataclasses
from typing import Sequence

import numpy as np

from diffmix_jax.mixing import tiles as tiles_lib
from diffmix_jax.mixing.tiles import Tile

COLLISIONS = ('overwrite', 'reject')  # §3.3.
PRESETS = ('recovered', 'author_issue3')  # §3.3.


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
  tiles_lib.keep_largest_component(out, sorted(victims), boxes)
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
  offsets = tiles_lib.grid_offsets(h, w, params.patch_size, params.stride)
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
  return tiles_lib.map_tiles(lambda i: enlarge_tile(tiles[i], i, params, seed), len(tiles),
                             num_workers)
