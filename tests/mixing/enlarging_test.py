"""Tests of diffmix_jax.mixing.enlarging and the patch grid (docs/method.md §3.2-§4.1, §8)."""

import numpy as np
import pytest
from skimage import measure
from skimage import morphology

from diffmix_jax.mixing import enlarging
from diffmix_jax.mixing import tiles as mixing_tiles
from label_maps import random_tile
from label_maps import random_tiles

EP = enlarging.EnlargeParams()


def test_grid():
  """§8 item 9."""
  off = mixing_tiles.grid_offsets(1000, 1000, 256, 76)
  assert len(off) == 100
  assert off[12].tolist() == [76, 152] and off[99].tolist() == [684, 684]
  cover = np.zeros((1000, 1000), bool)
  for r, c in off:
    cover[r:r + 256, c:c + 256] = True
  assert cover[:940, :940].all() and not cover[940:].any() and not cover[:, 940:].any()
  assert mixing_tiles.grid_offsets(256, 256, 256, 76).tolist() == [[0, 0]]
  assert len(mixing_tiles.grid_offsets(200, 300, 256, 76)) == 0


def test_covering_offsets_hand_case():
  """Balancing's 'cover' patches (sample.balance_patches): 40-px patches on a 105-px tile, grid
  positions 0, 20, 40, 60 and the last, 65."""
  boxes = [(5, 5, 15, 15),  # A: only patch (0, 0) holds it.
           (25, 25, 35, 35),  # B: held by (0, 0), (20, 20) and (22, 0).
           (97, 97, 103, 103),  # C: at the far corner; only a row/col of 65 (the last) holds it.
           (10, 50, 20, 95),  # D: 45 px wide, larger than a patch.
           (42, 42, 52, 52),  # E: held by (20, 20), (20, 40), (40, 20), (40, 40).
           (23, 3, 61, 13)]  # F: 38 px tall; rows 21..23 hold it, no grid row: the centred (22, 0).
  off, held = mixing_tiles.covering_offsets(np.array(boxes), 105, 105, 40, 20)
  # Pick 1: (0, 0) [A, B], (20, 20) [B, E] and (22, 0) [F, B] hold two each; (20, 20)'s lie
  # closest to its centre (200 + 98 against 400 and 144 + 244). Then one each: F by (22, 0) (144),
  # A by (0, 0) (200), C by (65, 65) (450).
  assert off.tolist() == [[0, 0], [20, 20], [22, 0], [65, 65]] and off.dtype == np.int32
  assert held.tolist() == [True, True, True, False, True, True]
  for (r0, c0, r1, c1), h in zip(boxes, held):
    assert h == any(r <= r0 and r + 40 >= r1 and c <= c0 and c + 40 >= c1 for r, c in off)
  off, held = mixing_tiles.covering_offsets(np.array(boxes), 30, 105, 40, 20)
  assert off.shape == (0, 2) and not held.any()
  off, held = mixing_tiles.covering_offsets(np.zeros((0, 4)), 100, 100, 40, 20)
  assert off.shape == (0, 2) and held.shape == (0,)
  # A 44-px box in a 48-px patch is held for any candidate stride.
  for stride in (1, 8, 48, 500):
    off, held = mixing_tiles.covering_offsets(np.array([[3, 50, 47, 60]]), 100, 100, 48, stride)
    assert held.all() and len(off) == 1


def _check_patch(tile, res, p, params):
  """§8 item 7 for patch p of an EnlargeResult."""
  s, fm = params.patch_size, params.frame_margin
  r, c = res.offsets[p]
  crop = tile.inst_map[r:r + s, c:c + s]
  real_ids = res.real_ids[p]
  lut = {int(v): k for k, v in enumerate(real_ids) if v}
  real = np.vectorize(lambda v: lut.get(int(v), 0))(crop)
  out = res.inst_maps[p]
  mv = {k: v[res.moves['patch'] == p] for k, v in res.moves.items()}
  frame = np.ones((s, s), bool)
  frame[fm:s - fm, fm:s - fm] = False
  border = set(np.unique(real[frame]).tolist()) - {0}
  interior = sorted(set(np.unique(real).tolist()) - {0} - border)
  assert mv['id'].tolist() == interior
  # The draws are exactly those of the patch's Generator (§3.2 step 2, §3.3 RNG).
  rng = np.random.default_rng(np.random.SeedSequence(SEED, spawn_key=(0, p, 1)))
  m = len(interior)
  dy = rng.integers(params.shift_low, params.shift_high + 1, size=m)
  dx = rng.integers(params.shift_low, params.shift_high + 1, size=m)
  gx = rng.random(m) >= 1 - params.axis_probability
  gy = rng.random(m) >= 1 - params.axis_probability
  np.testing.assert_array_equal(mv['dy'], np.where(gy, dy, 0))
  np.testing.assert_array_equal(mv['dx'], np.where(gx, dx, 0))
  assert np.all((mv['dy'] >= params.shift_low) & (mv['dy'] <= params.shift_high))
  new_pos = np.zeros((s, s), bool)
  for i, sy, sx, moved in zip(mv['id'], mv['dy'], mv['dx'], mv['moved']):
    moved_to = np.roll(real == i, (sy, sx), axis=(0, 1)) if moved else real == i
    got = out == i
    assert not np.any(got & ~moved_to)
    if params.collision == 'reject':
      np.testing.assert_array_equal(got, moved_to)
      assert not np.any(moved_to & (real != 0) & (real != i))
    new_pos |= got
  for i in border:  # border nuclei never move; they only lose pixels that others now cover
    before, after = real == i, out == i
    assert not np.any(after & ~before)
    if params.collision == 'reject' or not np.any(before & new_pos):
      np.testing.assert_array_equal(after, before)
  # Classes are per id and real; type > 0 <=> inst > 0; one component per moved id.
  types = res.type_maps()[p]
  np.testing.assert_array_equal(types > 0, out > 0)
  np.testing.assert_array_equal(res.classes[p][1:len(lut) + 1], tile.classes[real_ids[1:len(lut) + 1]])
  for i in np.unique(out[out > 0]):
    assert np.unique(types[out == i]).tolist() == [res.classes[p][i]]
    if i in interior:
      assert measure.label(out == i, connectivity=1).max() == 1
  if params.collision == 'reject':
    assert sorted(np.unique(out).tolist()) == sorted(np.unique(real).tolist())
  return len(interior)


SEED = 5


@pytest.mark.parametrize('collision', ['overwrite', 'reject'])
def test_enlarge_geometry(collision):
  tile = random_tile(np.random.default_rng(3), 'dense', size=484, tries=4000)
  params = enlarging.EnlargeParams(collision=collision)
  res = enlarging.enlarge_tile(tile, 0, params, SEED)
  assert res.inst_maps.shape == (16, 256, 256) and res.inst_maps.dtype == np.int32
  n = sum(_check_patch(tile, res, p, params) for p in range(16))
  assert n > 100
  assert res.num_moved.sum() > 0
  if collision == 'reject':
    dropped = ((res.moves['dy'] != 0) | (res.moves['dx'] != 0)) & (res.moves['moved'] == 0)
    assert dropped.sum() > 0


def test_enlarge_author_issue3():
  tile = random_tile(np.random.default_rng(4), 'dense', size=300, tries=2000)
  params = enlarging.EnlargeParams(axis_probability=1.0, shift_low=-3, shift_high=3)  # author_issue3
  res = enlarging.enlarge_tile(tile, 0, params, SEED)
  assert res.moves['gate_x'].all() and res.moves['gate_y'].all()
  assert set(res.moves['dy'].tolist()) == set(range(-3, 4))
  for p in range(len(res.offsets)):
    _check_patch(tile, res, p, params)


def test_gate_statistics():
  """§8 item 8: over >= 10,000 interior nuclei, P(dx != 0) = 0.29 and P(moved) = 0.496."""
  inst = np.zeros((1000, 1000), np.int32)
  d = morphology.disk(2).astype(bool)
  k = 0
  for r in range(4, 996, 8):
    for c in range(4, 996, 8):
      k += 1
      inst[r - 2:r + 3, c - 2:c + 3][d] = k
  tile = mixing_tiles.prepare_tile('lattice', inst, (inst > 0).astype(np.int32) * 2, 5)
  res = enlarging.enlarge_tile(tile, 0, EP, 0)
  dx, dy = res.moves['dx'], res.moves['dy']
  assert len(dx) >= 10_000
  assert abs(np.mean(dx != 0) - 0.29) <= 0.01
  assert abs(np.mean(dy != 0) - 0.29) <= 0.01
  assert abs(np.mean((dx != 0) | (dy != 0)) - 0.496) <= 0.015
  assert dx.min() == -15 and dx.max() == 14
  assert res.num_moved.sum() == np.sum((dx != 0) | (dy != 0))


def test_determinism_order_and_threads():
  """§8 item 10: the same maps whatever the tile order or thread count."""
  tiles = random_tiles(5, count=5, size=300)
  en = enlarging.enlarge_all(tiles, EP, 42)
  for i in reversed(range(len(tiles))):
    np.testing.assert_array_equal(enlarging.enlarge_tile(tiles[i], i, EP, 42).inst_maps,
                                  en[i].inst_maps)
  for a, b in zip(enlarging.enlarge_all(tiles, EP, 42, num_workers=2), en):
    np.testing.assert_array_equal(a.inst_maps, b.inst_maps)
