"""Tests of input_pipeline.py: determinism, per-process sharding, exact resume, crops and augmentation."""

import numpy as np
import pytest

from diffmix_jax.data import input_pipeline


def fake_source(n=5, size=20, seed=0):
  """Tiles whose image channel 0 equals the instance map, so geometry can be followed exactly."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    inst = rng.integers(0, 50, (size, size + 3)).astype(np.int32)
    image = np.stack([inst, rng.integers(0, 256, inst.shape), np.full(inst.shape, i)], -1)
    out.append({'name': f'tile_{i}'.encode(), 'image': image.astype(np.uint8), 'inst_map': inst,
                'type_map': (inst % 5).astype(np.int32)})
  return out


def _equal(a, b):
  return all(np.array_equal(a[k], b[k]) for k in ('image', 'inst_map', 'type_map'))


def test_same_seed_same_batches_other_seed_other_batches():
  src = fake_source()
  a = input_pipeline.train_dataset(src, crop_size=8, global_batch=4, seed=1)
  b = input_pipeline.train_dataset(src, crop_size=8, global_batch=4, seed=1)
  c = input_pipeline.train_dataset(src, crop_size=8, global_batch=4, seed=2)
  assert all(_equal(a[k], b[k]) for k in range(12))
  assert not all(_equal(a[k], c[k]) for k in range(3))


def test_batch_contents_and_scaling():
  batch = input_pipeline.train_dataset(fake_source(), crop_size=8, global_batch=4, seed=0)[3]
  assert batch['image'].shape == (4, 8, 8, 3) and batch['image'].dtype == np.float32
  assert batch['inst_map'].shape == (4, 8, 8) and batch['inst_map'].dtype == np.int32
  # Labels follow the image through crop and augmentation: channel 0 was the instance map.
  np.testing.assert_allclose((batch['image'][..., 0] + 1) * 127.5, batch['inst_map'], atol=1e-3)
  np.testing.assert_array_equal(batch['type_map'], batch['inst_map'] % 5)


def test_processes_assemble_the_single_process_global_batch():
  src = fake_source()
  single = input_pipeline.train_dataset(src, crop_size=8, global_batch=8, seed=3)
  for count in (2, 4):
    parts = [input_pipeline.train_dataset(src, crop_size=8, global_batch=8, seed=3,
                                          process_index=p, process_count=count)
             for p in range(count)]
    for k in range(5):
      glued = {key: np.concatenate([p[k][key] for p in parts]) for key in ('image', 'inst_map',
                                                                          'type_map')}
      assert _equal(glued, single[k])
  with pytest.raises(ValueError, match='global batch 8 is not divisible by the process count 3'):
    input_pipeline.train_dataset(src, crop_size=8, global_batch=8, seed=3, process_count=3)


def test_epoch_covers_every_tile_and_augmentation_once():
  src = fake_source(n=3)
  seen = []
  ds = input_pipeline.train_dataset(src, crop_size=20, global_batch=1, seed=0)
  # With crop 20 on 20-row tiles only the column offset varies; channel 2 of the image is the tile id.
  for k in range(3 * input_pipeline.NUM_AUGS):
    seen.append(int(round((ds[k]['image'][0, 0, 0, 2] + 1) * 127.5)))
  assert sorted(seen) == sorted(list(range(3)) * input_pipeline.NUM_AUGS)


def test_iterator_state_restore_continues_identically():
  ds = input_pipeline.train_dataset(fake_source(), crop_size=8, global_batch=4, seed=5)
  it = iter(ds)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]
  fresh = iter(input_pipeline.train_dataset(fake_source(), crop_size=8, global_batch=4, seed=5))
  fresh.set_state(state)
  assert all(_equal(next(fresh), e) for e in expected)


def test_every_crop_offset_is_reachable():
  rng = np.random.default_rng(0)
  offsets = {input_pipeline.crop_offsets(rng, (258, 260), 256) for _ in range(400)}
  assert offsets == {(y, x) for y in range(3) for x in range(5)}
  with pytest.raises(ValueError, match='smaller than the crop size 256'):
    input_pipeline.crop_offsets(rng, (200, 300), 256)


def test_dihedral_augmentations():
  a = np.arange(6).reshape(2, 3)
  np.testing.assert_array_equal(input_pipeline.dihedral(a, 0), a)
  np.testing.assert_array_equal(input_pipeline.dihedral(a, 1), [[2, 5], [1, 4], [0, 3]])
  np.testing.assert_array_equal(input_pipeline.dihedral(a, 2), [[5, 4, 3], [2, 1, 0]])
  np.testing.assert_array_equal(input_pipeline.dihedral(a, 3), [[3, 0], [4, 1], [5, 2]])
  np.testing.assert_array_equal(input_pipeline.dihedral(a, 4), [[2, 1, 0], [5, 4, 3]])
  np.testing.assert_array_equal(input_pipeline.dihedral(a, 5), [[3, 4, 5], [0, 1, 2]])
  rgb = np.stack([a, a + 10, a + 20], -1)  # Channels stay in place.
  np.testing.assert_array_equal(input_pipeline.dihedral(rgb, 1)[..., 1], input_pipeline.dihedral(
      a, 1) + 10)


def test_eval_items_are_disjoint_and_cover_all_once():
  for count in (1, 2, 3, 8):
    parts = [input_pipeline.eval_indices(10, p, count) for p in range(count)]
    flat = sorted(i for part in parts for i in part)
    assert flat == list(range(10))
  assert input_pipeline.eval_indices(5, 1, 2) == [1, 3]


def test_tile_subset_keeps_the_builder_order_and_rejects_unknown_names(tiny_built):
  from configs import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.data.test_tiles = ('test_3', 'test_1')
  tiles = input_pipeline.load_split(config, str(tiny_built), 'test')
  everything = input_pipeline.load_split(tiny.get_config(), str(tiny_built), 'test')
  assert [t['name'] for t in tiles] == ['test_1', 'test_3']
  assert _equal(tiles[1], everything[2])
  source = input_pipeline.source_for(config, str(tiny_built), 'test')
  assert len(source) == 2 and source[1]['name'] in (b'test_3', 'test_3')
  config.data.test_tiles = ('test_1', 'test_9')
  with pytest.raises(ValueError, match=r"config\.data\.test_tiles: unknown tile\(s\) \['test_9'\]"):
    input_pipeline.load_split(config, str(tiny_built), 'test')
