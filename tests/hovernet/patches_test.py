"""HoVer-Net training data: the synthetic reader and its manifest, packing, and the batches of the
ablation arms (same real rows for every arm of a seed, synthetic rows drawn in cycles)."""

import json

import cv2
import numpy as np
import pytest
from scipy import io as sio

from configs import tiny
from diffmix_jax.core import arms
from diffmix_jax.core import sharding
from tfds_builders.demo_nuclei import generate as demo_tiles
from diffmix_jax.hovernet import patches as hovernet_data
from diffmix_jax.stages import hovernet_train


def _tile(i=0):
  image, inst, types = demo_tiles.make_tile(0, 'train', i)
  return {'name': f'train_{i}', 'image': image, 'inst_map': inst, 'type_map': types}


def _synthetic(n, side, ids_per_patch=3):
  """n synthetic patches whose pixels name their patch: image value k + 1, instance ids 1..ids."""
  out = []
  for k in range(n):
    inst = np.zeros((side, side), np.int32)
    for i in range(ids_per_patch):
      inst[2 * i:2 * i + 2, :4] = i + 1
    out.append({'name': f's_{k}', 'image': np.full((side, side, 3), k + 1, np.uint8),
                'inst_map': inst, 'type_map': (inst > 0).astype(np.int32) * (k % 4 + 1)})
  return out


def _write_set(folder, patches, kinds=None):
  """The sample stage's CoNSeP layout; with `kinds` also its manifest."""
  (folder / 'Images').mkdir(parents=True)
  (folder / 'Labels').mkdir()
  for p in patches:
    cv2.imwrite(str(folder / 'Images' / f'{p["name"]}.png'), p['image'][..., ::-1])
    sio.savemat(folder / 'Labels' / f'{p["name"]}.mat',
                {'inst_map': p['inst_map'], 'type_map': p['type_map']})
  if kinds is not None:
    (folder / hovernet_data.MANIFEST).write_text(json.dumps({'patches': {
        p['name']: {'kind': k, 'tile': 'train_0', 'patch': i, 'offset': [0, 0]}
        for i, (p, k) in enumerate(zip(patches, kinds))}}))


def test_synthetic_reader_contract_kinds_and_missing_parts(tmp_path):
  config = tiny.get_config()
  config.hovernet.train.runs = ('diffmix',)
  with pytest.raises(FileNotFoundError, match='set written by the `sample` stage'):
    hovernet_train.train_run(config, str(tmp_path), 'diffmix', tiles=[_tile()], val_tiles=[])
  with pytest.raises(ValueError, match="unknown arm 'other'"):
    hovernet_train.train_run(config, str(tmp_path), 'other')
  tile = _tile()
  crop = {'name': 's_0', 'image': tile['image'][:64, :64], 'inst_map': tile['inst_map'][:64, :64],
          'type_map': tile['type_map'][:64, :64]}
  _write_set(tmp_path / 'a', [crop] + _synthetic(3, 64)[1:], kinds=None)
  got = hovernet_data.read_synthetic(tmp_path / 'a')
  assert [g['name'] for g in got] == ['s_0', 's_1', 's_2']
  np.testing.assert_array_equal(got[0]['image'], crop['image'])
  np.testing.assert_array_equal(got[0]['inst_map'], crop['inst_map'])
  # Every patch without a manifest; one kind only needs it.
  assert len(hovernet_data.read_synthetic(tmp_path / 'a', ('balance', 'enlarge'))) == 3
  with pytest.raises(FileNotFoundError, match='manifest.json: missing'):
    hovernet_data.read_synthetic(tmp_path / 'a', ('balance',))
  _write_set(tmp_path / 'b', _synthetic(3, 64), kinds=['enlarge', 'balance', 'enlarge'])
  names = lambda kinds: [g['name'] for g in hovernet_data.read_synthetic(tmp_path / 'b', kinds)]
  assert names(arms.ARMS['balancing']) == ['s_1']
  assert names(arms.ARMS['enlarging']) == ['s_0', 's_2']
  assert names(arms.ARMS['diffmix']) == ['s_0', 's_1', 's_2']
  manifest = json.loads((tmp_path / 'b' / hovernet_data.MANIFEST).read_text())
  del manifest['patches']['s_2']
  (tmp_path / 'b' / hovernet_data.MANIFEST).write_text(json.dumps(manifest))
  with pytest.raises(ValueError, match=r"no entry for 1 patch\(es\), e.g. \['s_2'\]"):
    hovernet_data.read_synthetic(tmp_path / 'b', ('enlarge',))


def test_small_synthetic_patches_are_packed_with_distinct_instance_ids():
  packed = hovernet_data.pack_patches(_synthetic(20, 64), 256)
  assert [p['name'] for p in packed] == ['packed_0', 'packed_1']
  first = packed[0]
  assert first['image'].shape == (256, 256, 3) and first['inst_map'].shape == (256, 256)
  # Patch n sits at grid cell divmod(n, 4), row-major; its ids are offset by 3 n.
  np.testing.assert_array_equal(first['image'][64:128, 128:192], 7)  # Patch 6: value 7.
  assert set(np.unique(first['inst_map'][64:128, 128:192])) == {0, 19, 20, 21}
  assert len(np.unique(first['inst_map'])) == 16 * 3 + 1
  # The last window: patches 16-19 in row 0, then patches 0-11 again (no black cells).
  assert packed[1]['image'][0, 64 * 3, 0] == 20 and packed[1]['image'][64, 0, 0] == 1
  assert packed[1]['image'][255, 255, 0] == 12 and packed[1]['image'].min() > 0
  assert packed[1]['inst_map'].max() == 16 * 3 and len(np.unique(packed[1]['inst_map'])) == 49
  tiny = hovernet_data.pack_patches(_synthetic(3, 64), 256)  # Fewer patches than cells: cycled.
  assert len(tiny) == 1 and [tiny[0]['image'][0, 64 * c, 0] for c in range(4)] == [1, 2, 3, 1]
  same = _synthetic(3, 256)
  assert hovernet_data.pack_patches(same, 256) is same  # Window-sized patches stay as they are.
  mixed = _synthetic(2, 64) + _synthetic(1, 32)
  with pytest.raises(ValueError, match=r's_0 \(64, 64\) and s_0 \(32, 32\) differ in size'):
    hovernet_data.pack_patches(mixed, 256)


def test_packed_mosaics_are_cut_into_windows_whose_outputs_cover_every_patch():
  """Window 256, step 164 (fast mode: output 164): each 256-px mosaic gives 4 mirror-mode windows
  (official order: grid, bottom row, right column, corner);
  window (r, c)'s central 164 px are mosaic rows r..r+163, cols c..c+163, and together they cover it."""
  patches = _synthetic(20, 64)
  mosaics = hovernet_data.pack_patches(patches, 256)
  items = hovernet_data.synthetic_items(patches, 256, 164)
  assert [p['name'] for p in items] == [f'packed_{k}_{r}_{c}' for k in (0, 1)
                                        for r, c in ((0, 0), (92, 0), (0, 92), (92, 92))]
  for k, mosaic in enumerate(mosaics):
    covered = np.zeros((256, 256), bool)
    for item in items[4 * k:4 * k + 4]:
      r, c = (int(x) for x in item['name'].split('_')[2:])
      assert item['image'].shape == (256, 256, 3) and item['type_map'].shape == (256, 256)
      out = (slice(46, 210), slice(46, 210))
      np.testing.assert_array_equal(item['image'][out], mosaic['image'][r:r + 164, c:c + 164])
      np.testing.assert_array_equal(item['inst_map'][out], mosaic['inst_map'][r:r + 164, c:c + 164])
      np.testing.assert_array_equal(item['type_map'][out], mosaic['type_map'][r:r + 164, c:c + 164])
      covered[r:r + 164, c:c + 164] = True
    assert covered.all()
  # Mirror context, not black: the window's border reflects the mosaic.
  np.testing.assert_array_equal(items[0]['image'][45, 46:110], mosaics[0]['image'][1, 0:64])
  # A 240-px mosaic at step = window (no mirror margin) has no whole window: it stays as it is.
  small = hovernet_data.synthetic_items(_synthetic(20, 48), 256, 256)
  assert [p['name'] for p in small] == ['packed_0'] and small[0]['image'].shape == (240, 240, 3)
  # Window-sized patches join untouched.
  same = _synthetic(3, 256)
  assert hovernet_data.synthetic_items(same, 256, 164) is same


def test_synthetic_rows_per_batch_and_cycles():
  # ratio r: round(r * real rows); r < 0: ceil(items / steps per epoch), each seen once an epoch.
  assert hovernet_data.synthetic_per_batch(0.5, 2, 11, 16) == 1
  assert hovernet_data.synthetic_per_batch(0.25, 16, 1, 2) == 4
  assert hovernet_data.synthetic_per_batch(0.1, 2, 11, 16) == 0
  assert hovernet_data.synthetic_per_batch(-1, 4, 1350, 330) == 5
  assert hovernet_data.synthetic_per_batch(-1, 4, 1320, 330) == 4
  # 5 items, 2 per batch: batches 0-1 and the first row of batch 2 are one permutation of 0..4.
  seq = np.concatenate([hovernet_data.cycle_indices(5, s, 2, (0, 0, 1, 1)) for s in range(5)])
  assert sorted(seq[:5]) == [0, 1, 2, 3, 4] and sorted(seq[5:]) == [0, 1, 2, 3, 4]
  assert seq[:5].tolist() != seq[5:].tolist()  # Reshuffled each cycle (fixed seed: known to differ).


def test_only_a_phase_that_runs_needs_its_batch_to_fit_the_windows(tmp_path):
  config = tiny.get_config()  # Phase 2 only, one 256-px window per tile.
  config.mesh.data = 2
  h = config.hovernet.train
  h.phase1_batch_size, h.phase2_batch_size = 8, 2
  mesh = sharding.create_mesh(config.mesh)
  tiles = [_tile(0), _tile(1)]
  data = hovernet_train._training_data(config, str(tmp_path), 'baseline', mesh, tiles, [])
  assert data.phase_steps == (0, 1) and data.steps_per_epoch[1] == 1
  h.phase2_batch_size = 4
  with pytest.raises(ValueError, match=r'phase2_batch_size=4 exceeds the 2 real windows'):
    hovernet_train._training_data(config, str(tmp_path), 'baseline', mesh, tiles, [])


def _batches(synthetic, synthetic_batch, seed, steps=4):
  real = hovernet_data.PatchSet([_tile(0), _tile(1)], 256, 164)  # 8 windows.
  it = hovernet_data.create_dataset(
      real, synthetic, seeds=hovernet_data.Seeds.of(0, seed, 1), real_batch=2,
      synthetic_batch=synthetic_batch, start=0, total=steps, input_size=256, output_size=164,
      augment=True, num_threads=1)
  return [next(it) for _ in range(steps)]


def test_arms_of_a_seed_share_their_real_rows_and_seeds_differ():
  """The paired design: an arm adds synthetic rows after the real ones, which stay identical
  (window order and augmentation) to the baseline's; another HoVer-Net seed changes them."""
  base = _batches([], 0, seed=0)
  mixed = _batches(hovernet_data.pack_patches(_synthetic(6, 64), 256), 1, seed=0)
  other = _batches([], 0, seed=1)
  for b, m in zip(base, mixed):
    assert b['image'].shape == (2, 256, 256, 3) and m['image'].shape == (3, 256, 256, 3)
    for key in ('image', 'np', 'tp', 'hv'):
      np.testing.assert_array_equal(b[key], m[key][:2])
  assert not all(np.array_equal(b['image'], o['image']) for b, o in zip(base, other))
