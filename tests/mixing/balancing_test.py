"""Tests of diffmix_jax.mixing.balancing and the tile tables (docs/method.md §2.2-§2.4, §8)."""

import math

import numpy as np
import pytest
from scipy import ndimage
from skimage import measure
from skimage import morphology

from diffmix_jax.mixing import balancing
from diffmix_jax.mixing import tiles as mixing_tiles
from label_maps import CROSS
from label_maps import disk_at
from label_maps import known_answer_tiles
from label_maps import random_tiles

BP = balancing.BalanceParams()


# ---------------------------------------------------------------------------------------------
# An independent, straightforward reference of §2.2 with F3-F8 (whole-tile loops, no windows).


def reference_balance(tiles, index, seed, params=BP):
  info = []
  for t in tiles:
    h, w = t.inst_map.shape
    d = {}
    for i in range(1, int(t.inst_map.max()) + 1):
      mask = t.inst_map == i
      if mask.any():
        y, x = ndimage.center_of_mass(mask)
        ok = (params.border_margin <= x <= w - params.border_margin
              and params.border_margin <= y <= h - params.border_margin)
        d[i] = dict(mask=mask, area=int(mask.sum()), cls=int(t.classes[i]), x=x, y=y, ok=ok)
    info.append(d)
  me = info[index]
  rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index, 0)))
  cands = [i for c in params.common_classes for i in sorted(me) if me[i]['cls'] == c and me[i]['ok']]
  k = int(np.floor(params.target_fraction * len(cands)))
  draw = rng.choice(np.array(cands, np.int64), k, replace=False)
  others = rng.permutation(np.array([t for t in range(len(tiles)) if t != index], np.int64))
  targets = sorted(draw.tolist(), key=lambda i: me[i]['area'])
  pool = [(t, i) for t in [index] + others.tolist() for i in sorted(info[t])
          if info[t][i]['cls'] in params.rare_classes and info[t][i]['ok']]
  out = tiles[index].inst_map.copy()
  cls = {i: me[i]['cls'] for i in me}
  prov = []
  for j in targets:
    if params.max_replacements_per_tile is not None and len(prov) >= params.max_replacements_per_tile:
      break
    area = ndimage.binary_dilation(me[j]['mask'], CROSS, iterations=params.dilation_iterations).sum()
    fit = [p for p, (t, i) in enumerate(pool) if area >= params.area_ratio * info[t][i]['area']]
    if not fit:
      continue
    t, i = pool.pop(fit[0])
    out[out == j] = 0
    rr, cc = np.nonzero(info[t][i]['mask'])
    crop = info[t][i]['mask'][rr.min():rr.max() + 1, cc.min():cc.max() + 1]
    top = math.floor(np.round(me[j]['y']) - crop.shape[0] / 2)
    left = math.floor(np.round(me[j]['x']) - crop.shape[1] / 2)
    for a, b in zip(*np.nonzero(crop)):
      r, c = top + a, left + b
      if 0 <= r < out.shape[0] and 0 <= c < out.shape[1]:
        if params.paste_mode == 'overwrite' or out[r, c] == 0:
          out[r, c] = j
    cls[j] = info[t][i]['cls']
    prov.append((j, t, i))
  for i in np.unique(out[out > 0]):
    lab = measure.label(out == i, connectivity=1)
    if lab.max() > 1:
      sizes = np.bincount(lab.ravel())[1:]
      out[(lab > 0) & (lab != np.argmax(sizes) + 1)] = 0
  return out, cls, prov


# ---------------------------------------------------------------------------------------------
# Balancing.


@pytest.mark.parametrize('seed', range(5))
def test_known_answer_fixture(seed):
  """§8 item 6: tile A gets exactly 3 replacements in pool order; tile B none."""
  tiles = known_answer_tiles()
  res = balancing.balance_tile(tiles, 0, BP, seed)
  rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0, 0)))
  draw = rng.choice(np.arange(1, 6), 4, replace=False)
  pv = res.provenance
  assert res.num_targets == 4
  assert pv['target_id'].tolist() == draw[:3].tolist()  # equal areas: draw order kept
  assert list(zip(pv['donor_tile'].tolist(), pv['donor_id'].tolist())) == [(0, 6), (1, 1), (1, 2)]
  assert pv['donor_area'].tolist() == [29, 49, 81]
  assert pv['target_dilated_area'].tolist() == [233, 233, 233]
  a = tiles[0]
  untouched = int(draw[3])
  np.testing.assert_array_equal(res.inst_map == untouched, a.inst_map == untouched)
  np.testing.assert_array_equal(res.inst_map == 6, a.inst_map == 6)  # A's own donor stays
  classes = dict(zip(res.ids.tolist(), res.inst_type.tolist()))
  assert sorted(classes) == [1, 2, 3, 4, 5, 6]
  assert sorted(classes.values()) == [1, 1, 1, 1, 2, 2]
  for j, r in zip(pv['target_id'], [3, 4, 5]):
    row, col = (np.array(ndimage.center_of_mass(a.inst_map == j))).round()
    size = 2 * r + 1
    top, left = math.floor(row - size / 2), math.floor(col - size / 2)
    expect = np.zeros_like(a.inst_map, bool)
    expect[top:top + size, left:left + size] = morphology.disk(r).astype(bool)
    np.testing.assert_array_equal(res.inst_map == j, expect)
  out, cls, prov = reference_balance(tiles, 0, seed)
  np.testing.assert_array_equal(res.inst_map, out)
  assert [(p[0], p[1], p[2]) for p in prov] == list(zip(*(pv[k].tolist() for k in
                                                          ('target_id', 'donor_tile', 'donor_id'))))
  res_b = balancing.balance_tile(tiles, 1, BP, seed)
  assert res_b.num_targets == 0 and len(res_b.provenance['target_id']) == 0
  np.testing.assert_array_equal(res_b.inst_map, tiles[1].inst_map)


@pytest.mark.parametrize('mode', ['overwrite', 'clip'])
@pytest.mark.parametrize('seed', [0, 1, 2])
def test_matches_independent_reference(mode, seed):
  tiles = random_tiles(seed)
  params = balancing.BalanceParams(paste_mode=mode)
  for index in range(len(tiles)):
    res = balancing.balance_tile(tiles, index, params, seed)
    out, cls, prov = reference_balance(tiles, index, seed, params)
    np.testing.assert_array_equal(res.inst_map, out)
    assert [p[0] for p in prov] == res.provenance['target_id'].tolist()
    assert [p[2] for p in prov] == res.provenance['donor_id'].tolist()
    assert dict(zip(res.ids.tolist(), res.inst_type.tolist())) == {
        i: cls[i] for i in np.unique(out[out > 0]).tolist()}


def _footprints(tiles, tile, res):
  """Paste footprints {target id: (bool [H, W], unclipped)} from donors and §2.2 step 4.5."""
  out = {}
  for j, dt, di in zip(*(res.provenance[k] for k in ('target_id', 'donor_tile', 'donor_id'))):
    rr, cc = np.nonzero(tiles[dt].inst_map == di)
    crop = (tiles[dt].inst_map == di)[rr.min():rr.max() + 1, cc.min():cc.max() + 1]
    x, y = tile.centroids[j]
    top, left = math.floor(np.round(y) - crop.shape[0] / 2), math.floor(np.round(x) - crop.shape[1] / 2)
    big = np.zeros((tile.inst_map.shape[0] + 80, tile.inst_map.shape[1] + 80), bool)
    big[top + 40:top + 40 + crop.shape[0], left + 40:left + 40 + crop.shape[1]] = crop
    out[int(j)] = (big[40:-40, 40:-40], bool(big[40:-40, 40:-40].sum() == crop.sum()))
  return out


@pytest.mark.parametrize('mode', ['overwrite', 'clip'])
def test_balance_properties(mode):
  """§8 items 2-5 on random tiles."""
  tiles = random_tiles(7, count=5)
  params = balancing.BalanceParams(paste_mode=mode)
  donors_total = sum(len(d) for d in balancing.rare_donors(tiles, params))
  total = 0
  for index, tile in enumerate(tiles):
    res = balancing.balance_tile(tiles, index, params, 3)
    inst0, out, pv = tile.inst_map, res.inst_map, res.provenance
    # Item 2: ids, classes, provenance, untouched nuclei.
    assert set(np.unique(out)) <= set(np.unique(inst0))
    replaced = set(pv['target_id'].tolist())
    classes = dict(zip(res.ids.tolist(), res.inst_type.tolist()))
    for j in replaced & set(classes):
      assert classes[j] == 1
    assert (pv['original_class'] >= 2).all() and (pv['donor_class'] == 1).all()
    feet = _footprints(tiles, tile, res)
    covered = np.zeros_like(out, bool)
    for m, _ in feet.values():
      covered |= m
    for i in set(np.unique(inst0[inst0 > 0]).tolist()) - replaced:
      before, after = inst0 == i, out == i
      assert not np.any(after & ~before)
      if mode == 'clip' or not np.any(before & covered):
        np.testing.assert_array_equal(after, before)
    # Item 3: consistency.
    np.testing.assert_array_equal(res.type_map > 0, out > 0)
    for i in res.ids:
      vals = np.unique(res.type_map[out == i])
      assert vals.tolist() == [classes[int(i)]]
      assert measure.label(out == i, connectivity=1).max() == 1
    # Item 4: rules per replacement.
    assert len(set(zip(pv['donor_tile'].tolist(), pv['donor_id'].tolist()))) == len(pv['donor_id'])
    assert np.all(pv['target_dilated_area'] >= 2.3 * pv['donor_area'])
    for j, dt, di, a in zip(pv['target_id'], pv['donor_tile'], pv['donor_id'],
                            pv['target_dilated_area']):
      assert a == ndimage.binary_dilation(inst0 == j, CROSS, iterations=2).sum()
      assert tiles[dt].areas[di] == (tiles[dt].inst_map == di).sum()
      for t, i in ((tile, j), (tiles[dt], di)):
        x, y = t.centroids[i]
        assert 30 <= x <= 170 and 30 <= y <= 170
    later = {}
    order = pv['target_id'].tolist()
    for n, j in enumerate(order):
      later[j] = np.zeros_like(out, bool)
      for k in order[n + 1:]:
        later[j] |= feet[k][0]
      foot, whole = feet[j]
      got = out == j
      assert not np.any(got & ~foot)  # pasted pixels lie in the translated donor mask
      if whole and mode == 'overwrite' and not np.any(foot & later[j]):
        np.testing.assert_array_equal(got, foot)
    # Item 5: counts.
    eligible_common = (mixing_tiles.eligible(tile, 30) & np.isin(tile.classes, [2, 3, 4])).sum()
    assert res.num_targets == math.floor(0.8 * eligible_common)
    assert len(order) <= min(res.num_targets, donors_total)
    total += len(order)
  assert total > 0


def test_paste_box_formula_recorded():
  tiles = random_tiles(11)
  res = balancing.balance_tile(tiles, 0, BP, 0)
  t = tiles[0]
  for j, top, left, h, w in zip(*(res.provenance[k] for k in
                                  ('target_id', 'box_top', 'box_left', 'box_h', 'box_w'))):
    x, y = t.centroids[j]
    assert (top, left) == (math.floor(np.round(y) - h / 2), math.floor(np.round(x) - w / 2))


def test_cap_per_tile():
  tiles = random_tiles(2, count=5)
  for cap in (0, 1, 3):
    params = balancing.BalanceParams(max_replacements_per_tile=cap)
    for index in range(len(tiles)):
      res = balancing.balance_tile(tiles, index, params, 0)
      assert len(res.provenance['target_id']) <= cap
      np.testing.assert_array_equal(res.inst_map, reference_balance(tiles, index, 0, params)[0])
  uncapped = sum(len(balancing.balance_tile(tiles, i, BP, 0).provenance['target_id']) for i in range(5))
  assert uncapped > 5


def test_paste_clipped_at_tile_edge():
  """F7: a paste box leaving the tile is clipped instead of raising."""
  inst, types = np.zeros((100, 100), np.int32), np.zeros((100, 100), np.int32)
  disk_at(inst, types, 3, 50, 3, 1, 2)  # target centroid 3 px from the top edge
  disk_at(inst, types, 60, 50, 5, 2, 1)  # donor, 11x11 box
  tiles = [mixing_tiles.prepare_tile('edge', inst, types, 5)]
  params = balancing.BalanceParams(border_margin=0, target_fraction=1.0, area_ratio=0.1)
  res = balancing.balance_tile(tiles, 0, params, 0)
  assert res.provenance['box_top'].tolist() == [math.floor(np.round(tiles[0].centroids[1, 1]) - 5.5)]
  expect = np.zeros((120, 100), bool)
  top, left = res.provenance['box_top'][0], res.provenance['box_left'][0]
  assert left == math.floor(np.round(tiles[0].centroids[1, 0]) - 5.5)
  expect[top + 20:top + 31, left:left + 11] = morphology.disk(5).astype(bool)
  np.testing.assert_array_equal(res.inst_map == 1, expect[20:])


def test_paste_that_splits_a_neighbour_keeps_its_largest_piece():
  """F6: a vertical rare bar pasted over a horizontal neighbour cuts it; only the larger side stays."""
  inst, types = np.zeros((200, 200), np.int32), np.zeros((200, 200), np.int32)
  disk_at(inst, types, 100, 100, 7, 1, 2)  # the only target (class 2), area 149, dilated 233
  inst[108:111, 80:126], types[108:111, 80:126] = 2, 3  # neighbour bar below the target
  inst[40:65, 40:43], types[40:65, 40:43] = 3, 1  # rare donor bar 25x3 = 75 px
  tiles = [mixing_tiles.prepare_tile('split', inst, types, 5)]
  params = balancing.BalanceParams(common_classes=(2,), target_fraction=1.0)
  res = balancing.balance_tile(tiles, 0, params, 0)
  assert res.provenance['donor_id'].tolist() == [3]
  assert (res.provenance['box_top'][0], res.provenance['box_left'][0]) == (87, 98)
  expect = np.zeros_like(inst, bool)
  expect[87:112, 98:101] = True
  np.testing.assert_array_equal(res.inst_map == 1, expect)
  expect = np.zeros_like(inst, bool)
  expect[108:111, 101:126] = True  # 25 columns right of the cut beat 18 on the left
  np.testing.assert_array_equal(res.inst_map == 2, expect)
  assert res.touched.tolist() == [2]
  np.testing.assert_array_equal(res.inst_map == 3, inst == 3)


def test_tile_without_eligible_nuclei():
  """Bad input: every nucleus within the border margin -> no target, map unchanged."""
  inst, types = np.zeros((120, 120), np.int32), np.zeros((120, 120), np.int32)
  for i, (r, c, cls) in enumerate([(10, 10, 2), (10, 100, 3), (110, 60, 1)], start=1):
    disk_at(inst, types, r, c, 4, i, cls)
  tiles = [mixing_tiles.prepare_tile('edge_only', inst, types, 5)] + random_tiles(0, count=2)
  assert not mixing_tiles.eligible(tiles[0], 30).any()
  res = balancing.balance_tile(tiles, 0, BP, 0)
  assert res.num_targets == 0 and len(res.provenance['target_id']) == 0
  np.testing.assert_array_equal(res.inst_map, inst)
  np.testing.assert_array_equal(res.type_map, types)


def test_prepare_tile_rejects_bad_types():
  inst = np.zeros((50, 50), np.int32)
  types = np.zeros((50, 50), np.int32)
  inst[10:20, 10:20] = 1
  with pytest.raises(ValueError, match='type_map > 0'):
    mixing_tiles.prepare_tile('x', inst, types, 5)
  types[10:20, 10:20] = 6
  with pytest.raises(ValueError, match=r'0\.\.4'):
    mixing_tiles.prepare_tile('x', inst, types, 5)


def _same_balance(a, b):
  np.testing.assert_array_equal(a.inst_map, b.inst_map)
  np.testing.assert_array_equal(a.type_map, b.type_map)
  for k in a.provenance:
    np.testing.assert_array_equal(a.provenance[k], b.provenance[k])


def test_determinism_order_and_threads():
  """§8 item 10: the same maps whatever the tile order or thread count; another seed differs."""
  tiles = random_tiles(5, count=5, size=300)
  base = balancing.balance_all(tiles, BP, 42)
  for i in reversed(range(len(tiles))):
    _same_balance(balancing.balance_tile(tiles, i, BP, 42), base[i])
  for a, b in zip(balancing.balance_all(tiles, BP, 42, num_workers=2), base):
    _same_balance(a, b)
  assert any(not np.array_equal(a.inst_map, b.inst_map)
             for a, b in zip(balancing.balance_all(tiles, BP, 43), base))
