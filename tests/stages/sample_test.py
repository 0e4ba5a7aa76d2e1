"""Tests of the synthesis stage: exports, read-back (the kill-and-resume test is in main_test.py)."""

import json

import numpy as np
import pytest

from configs import tiny
from diffmix_jax.metrics import records
from diffmix_jax.data import input_pipeline
from diffmix_jax.mixing import files as mixed_files
from diffmix_jax.mixing import tiles as mixing_tiles
from diffmix_jax.stages import sample
from diffmix_jax.data import synthetic as synthetic_io


@pytest.mark.slow
def test_exports_pass_evaluate_checks_and_agree_with_mixed_labels(sampled):
  workdir, config = sampled, tiny.get_config()
  labels_dir = workdir / 'synthetic' / 'consep_format' / 'Labels'
  files = sorted(labels_dir.glob('*.mat'))
  items = sample.work_items(config, str(workdir), {
      t['name']: t for t in input_pipeline.load_split(config, str(workdir), 'train')})
  assert len(files) == len(items) == len(list((labels_dir.parent / 'Images').glob('*.png')))
  size = config.sample.patch_size
  for path in files[::5]:
    record = records.load_mat(path)  # Raises on any input-check failure.
    tile, kind, patch = path.stem.rsplit('_', 2)
    mixed = mixed_files.load_mixed(workdir, kind, tile)
    if kind == 'balance':
      offsets = mixing_tiles.grid_offsets(256, 256, size, config.sample.grid_stride)
      r, c = (int(v) for v in offsets[int(patch)])
      inst = mixed['inst_map'][r:r + size, c:c + size]
      types = mixed['type_map'][r:r + size, c:c + size]
    else:
      inst, types = mixed['inst_maps'][int(patch)], mixed['type_maps'][int(patch)]
    # Class of each instance, in order of its original id (the export renumbers ids 1..N).
    ids = np.unique(inst[inst > 0])
    want = [int(types[inst == i][0]) for i in ids]
    np.testing.assert_array_equal(np.asarray(record['inst_type']).ravel(), want)
  # The figure: 8 rows of 4 panels of >= 128 px each (the 16-px patches upscaled
  # 8x by repetition, so each source pixel is an 8x8 block), short side >= 512 px, between a title
  # strip and a legend strip of 24 px each.
  from PIL import Image  # pylint: disable=g-import-not-at-top
  fig = np.asarray(Image.open(workdir / 'synthetic' / 'preview.png'))
  assert fig.shape == (24 + 8 * 128 + 24, 4 * 128, 3), fig.shape
  shown = fig[24:24 + 128:8, 2 * 128:3 * 128:8]  # Row 0's synthetic image, one pixel per block.
  images = np.concatenate([synthetic_io.read_shard(workdir, k)['image'] for k in range(4)])
  assert any(np.array_equal(shown, im) for im in images)


@pytest.mark.slow
def test_cover_patches_hold_every_replaced_nucleus(sampled):
  """sample.balance_patches='cover': the balancing items hold every replaced nucleus whole, and
  the enlarging items stay the grid's."""
  workdir, config = sampled, tiny.get_config()
  tiles = {t['name']: t for t in input_pipeline.load_split(config, str(workdir), 'train')}
  config.sample.patch_size, config.sample.grid_stride = 48, 104  # Enlarging: 3x3 per tile.
  grid_items = sample.work_items(config, str(workdir), tiles)
  config.sample.balance_patches, config.sample.cover_stride = 'cover', 8
  items = sample.work_items(config, str(workdir), tiles)
  assert [i for i in items if i[0] == 'enlarge'] == [i for i in grid_items if i[0] == 'enlarge']
  replaced = 0
  for name in mixed_files.mixed_names(workdir, 'balance'):
    mixed = mixed_files.load_mixed(workdir, 'balance', name)
    prov, inst = mixed['provenance'], mixed['inst_map']
    mine = [(r, c) for kind, n, _, r, c in items if kind == 'balance' and n == name]
    for i in prov['target_id'][prov['present'] > 0]:
      rows, cols = np.nonzero(inst == i)
      replaced += 1
      assert any(r <= rows.min() and rows.max() < r + 48 and c <= cols.min() and cols.max() < c + 48
                 for r, c in mine), (name, i)
    # Every picked patch holds a replaced nucleus.
    for r, c in mine:
      assert np.isin(inst[r:r + 48, c:c + 48], prov['target_id']).any()
  assert replaced > 0


@pytest.mark.slow
def test_a_set_rendered_for_other_patches_is_refused(sampled):
  """A finished set, or a killed run's shards, from another patch config is an error, not reused."""
  workdir, config = sampled, tiny.get_config()
  sample.run(config, str(workdir))  # Finished, same config: a no-op.
  config.sample.balance_patches = 'cover'
  with pytest.raises(ValueError, match=r"config.sample.balance_patches: 'grid' there, 'cover' now"):
    sample.run(config, str(workdir))
  config = tiny.get_config()
  tiles = {t['name']: t for t in input_pipeline.load_split(config, str(workdir), 'train')}
  items = sample.work_items(config, str(workdir), tiles)
  size = config.sample.shard_size
  sample._check_shards(str(workdir), items, size)  # pylint: disable=protected-access
  moved = items[:size + 3] + [items[size + 3][:3] + (1, 1)] + items[size + 4:]
  with pytest.raises(ValueError, match=r'shard_00001.npz holds other patches'):
    sample._check_shards(str(workdir), moved, size)  # pylint: disable=protected-access
  with pytest.raises(ValueError, match=r'shard_00007.npz holds other patches'):
    sample._check_shards(str(workdir), items[:-8], size)  # pylint: disable=protected-access


@pytest.mark.slow
def test_synthetic_set_reads_back_like_real_tiles(sampled):
  workdir, config = sampled, tiny.get_config()
  synth = synthetic_io.open_source(workdir)
  real = input_pipeline.source_for(config, str(workdir), 'train')
  folder = workdir / 'synthetic' / 'consep_format'
  assert len(synth) == len(list((folder / 'Labels').glob('*.mat')))
  # The manifest records each exported patch's mixing kind (the HoVer-Net arms select by it).
  manifest = json.loads((folder / 'manifest.json').read_text())['patches']
  assert sorted(manifest) == sorted(p.stem for p in (folder / 'Images').glob('*.png'))
  assert {m['kind'] for m in manifest.values()} == {'balance', 'enlarge'}
  assert all(f"_{m['kind']}_{m['patch']:03d}" in name for name, m in manifest.items())
  s, r = synth[0], real[0]
  for key in ('image', 'inst_map', 'type_map'):
    assert s[key].dtype == r[key].dtype and s[key].ndim == r[key].ndim
  size = config.sample.patch_size
  assert s['image'].shape == (size, size, 3)
  assert s['source_tile'] in (b'train_1', 'train_1') and s['kind'] in (b'balance', 'balance')
  batch = input_pipeline.train_dataset(synth, crop_size=size, global_batch=4, seed=0)[0]
  real_batch = input_pipeline.train_dataset(real, crop_size=size, global_batch=4, seed=0)[0]
  for key in batch:
    assert batch[key].shape == real_batch[key].shape and batch[key].dtype == real_batch[key].dtype
