"""Tests of the TFDS builders and build_data on files generated here in each dataset's own format."""

import json
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
import scipy.io

from conftest import HANG_TIMEOUT
from diffmix_jax.stages import build_data
from tfds_builders import raw_folders
from diffmix_jax.data import input_pipeline

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _label_maps(rng, raw_ids, size=40, n=6):
  """Instance map with n square nuclei and a raw class per nucleus (float64, as MATLAB writes)."""
  inst = np.zeros((size, size))
  types = np.zeros((size, size))
  classes = rng.choice(raw_ids, n)
  for k in range(n):
    y, x = (k // 3) * 12 + 2, (k % 3) * 12 + 2
    inst[y:y + 8, x:x + 8] = k + 1
    types[y:y + 8, x:x + 8] = classes[k]
  return inst, types, classes


def write_tile(root, split, name, rng, raw_ids, suffix='.png', mode='RGB', size=40, mat_extra=None,
               drop_keys=()):
  """Writes <root>/<Split>/Images/<name><suffix> and Labels/<name>.mat; returns the raw classes."""
  folder = pathlib.Path(root) / raw_folders.SPLIT_FOLDERS[split]
  (folder / 'Images').mkdir(parents=True, exist_ok=True)
  (folder / 'Labels').mkdir(parents=True, exist_ok=True)
  channels = {'RGB': 3, 'RGBA': 4, 'L': 1}[mode]
  pixels = rng.integers(0, 256, (size, size, channels), dtype=np.uint8)
  Image.fromarray(pixels[..., 0] if mode == 'L' else pixels, mode).save(folder / 'Images' /
                                                                         f'{name}{suffix}')
  inst, types, classes = _label_maps(rng, raw_ids, size)
  mat = {'inst_map': inst, 'type_map': types, 'inst_type': classes[:, None].astype(float),
         'inst_centroid': np.zeros((len(classes), 2))}
  mat.update(mat_extra or {})
  for k in drop_keys:
    mat.pop(k)
  scipy.io.savemat(folder / 'Labels' / f'{name}.mat', mat)
  return classes


def make_dataset(root, raw_ids, suffixes=('.png',), tiles=(3, 2), seed=0):
  """A small dataset; returns the raw classes of every nucleus per split."""
  rng = np.random.default_rng(seed)
  out = {}
  for split, n in zip(('train', 'test'), tiles):
    out[split] = np.concatenate([
        write_tile(root, split, f'{split}_{i + 1}', rng, raw_ids, suffixes[i % len(suffixes)])
        for i in range(n)])
  return out


def _counts(classes, table):
  merged = table[classes]
  ids, n = np.unique(merged, return_counts=True)
  return {str(i): int(c) for i, c in zip(ids, n)}


def test_consep_original_ids_are_merged(tmp_path):
  raw = make_dataset(tmp_path / 'raw', raw_ids=np.arange(1, 8))
  summary = build_data.build('consep', str(tmp_path / 'tfds'), str(tmp_path / 'raw'), 'original')
  table = raw_folders.merge_table('consep')
  for split in ('train', 'test'):
    assert summary['splits'][split]['nuclei_per_class'] == _counts(raw[split], table)
  src = input_pipeline.open_source('consep', str(tmp_path / 'tfds'), 'original', 'train')
  ex = src[0]
  assert ex['image'].dtype == np.uint8 and ex['image'].shape == (40, 40, 3)
  assert ex['inst_map'].dtype == np.int32 and ex['type_map'].dtype == np.int32
  assert ex['type_map'].max() <= 4
  # Type is constant per instance and equals the merged class of the written raw class.
  for k in range(1, 7):
    assert np.unique(ex['type_map'][ex['inst_map'] == k]).size == 1
  assert summary['splits']['train']['tiles'] == 3 and summary['splits']['test']['tiles'] == 2


def test_glysac_raw_ids_merged_and_tif_and_png_accepted(tmp_path):
  raw = make_dataset(tmp_path / 'raw', raw_ids=np.arange(1, 11), suffixes=('.tif', '.png'))
  summary = build_data.build('glysac', str(tmp_path / 'tfds'), str(tmp_path / 'raw'), 'original')
  table = raw_folders.merge_table('glysac')
  for split in ('train', 'test'):
    assert summary['splits'][split]['nuclei_per_class'] == _counts(raw[split], table)
  assert max(int(c) for c in summary['splits']['train']['nuclei_per_class']) <= 3


def test_merged_scheme_rejects_ids_above_4_naming_file_and_ids(tmp_path):
  rng = np.random.default_rng(1)
  for i in range(2):
    write_tile(tmp_path / 'raw', 'train', f'train_{i + 1}', rng, raw_ids=[1, 2, 3, 4])
  write_tile(tmp_path / 'raw', 'train', 'train_3', rng, raw_ids=[5, 6])
  write_tile(tmp_path / 'raw', 'test', 'test_1', rng, raw_ids=[1, 2])
  with pytest.raises(raw_folders.DatasetError, match=r'train_3\.mat: class ids \[5, 6\]'):
    build_data.build('consep', str(tmp_path / 'tfds'), str(tmp_path / 'raw'), 'merged')


def _expect_error(tmp_path, match, dataset='consep', scheme='original'):
  with pytest.raises((raw_folders.DatasetError, FileNotFoundError, ValueError), match=match):
    build_data.build(dataset, str(tmp_path / 'tfds'), str(tmp_path / 'raw'), scheme)
  # Nothing a rerun would trust: no finished dataset in data_dir.
  with pytest.raises(FileNotFoundError, match='not built'):
    input_pipeline.open_source(dataset, str(tmp_path / 'tfds'), scheme, 'train')


@pytest.mark.parametrize('case,match', [
    ('missing_split', r'missing folder .*Test/Images'),
    ('image_without_mat', r'train_9\.png \(expected train_9\.mat\)'),
    ('mat_without_image', r'train_9\.mat \(expected train_9\.png or train_9\.tif\)'),
    ('corrupt_png', r'cannot read image .*test_2\.png'),
    ('no_inst_map', r"test_2\.mat: no 'inst_map'"),
    ('no_type_map', r"test_2\.mat: no 'type_map'"),
    ('size_mismatch', r'test_2\.mat: label maps are 30x30 but image test_2\.png is 40x40'),
    ('non_integer_ids', r'test_2\.mat: inst_map holds non-integer values'),
    ('negative_ids', r'test_2\.mat: type_map holds negative ids'),
    ('ids_outside_scheme', r'test_2\.mat: class ids \[9\] are outside the original consep scheme'),
    ('grayscale', r'test_2\.png: grayscale'),
])
def test_bad_input_is_a_clear_error_naming_the_file(tmp_path, case, match):
  make_dataset(tmp_path / 'raw', raw_ids=np.arange(1, 8))
  rng = np.random.default_rng(5)
  raw = tmp_path / 'raw'
  if case == 'missing_split':
    for p in sorted((raw / 'Test').rglob('*'), reverse=True):
      p.unlink() if p.is_file() else p.rmdir()
    (raw / 'Test').rmdir()
  elif case == 'image_without_mat':
    write_tile(raw, 'train', 'train_9', rng, [1])
    (raw / 'Train' / 'Labels' / 'train_9.mat').unlink()
  elif case == 'mat_without_image':
    write_tile(raw, 'train', 'train_9', rng, [1])
    (raw / 'Train' / 'Images' / 'train_9.png').unlink()
  elif case == 'corrupt_png':
    (raw / 'Test' / 'Images' / 'test_2.png').write_bytes(b'\x89PNG\r\n\x1a\nnot a png at all')
  elif case == 'no_inst_map':
    write_tile(raw, 'test', 'test_2', rng, [1], drop_keys=('inst_map',))
  elif case == 'no_type_map':
    # inst_type alone would do (the nuclei_folder tests); with neither there are no classes.
    write_tile(raw, 'test', 'test_2', rng, [1], drop_keys=('type_map', 'inst_type'))
  elif case == 'size_mismatch':
    write_tile(raw, 'test', 'test_2', rng, [1], mat_extra={'inst_map': np.zeros((30, 30)),
                                                           'type_map': np.zeros((30, 30))})
  elif case == 'non_integer_ids':
    write_tile(raw, 'test', 'test_2', rng, [1], mat_extra={'inst_map': np.full((40, 40), 0.5)})
  elif case == 'negative_ids':
    write_tile(raw, 'test', 'test_2', rng, [1], mat_extra={'type_map': -np.ones((40, 40))})
  elif case == 'ids_outside_scheme':
    write_tile(raw, 'test', 'test_2', rng, [9])
  elif case == 'grayscale':
    write_tile(raw, 'test', 'test_2', rng, [1], mode='L')
  _expect_error(tmp_path, match)


def test_recoverable_input_is_fixed_with_warnings(tmp_path, caplog):
  raw = tmp_path / 'raw'
  make_dataset(raw, raw_ids=[1, 2], tiles=(1, 1))
  rng = np.random.default_rng(3)
  # RGBA image, inst_type of the wrong length, an instance with mixed types, gapped ids, empty map.
  inst = np.zeros((40, 40))
  inst[0:6, 0:6] = 4
  inst[10:16, 10:16] = 9
  types = np.where(inst > 0, 2.0, 0.0)
  types[0:2, 0:6] = 1  # 12 of 36 pixels of instance 4 say class 1: majority 2.
  write_tile(raw, 'train', 'train_2', rng, [1], mode='RGBA',
             mat_extra={'inst_map': inst, 'type_map': types, 'inst_type': np.ones((5, 1))})
  write_tile(raw, 'train', 'train_3', rng, [1],
             mat_extra={'inst_map': np.zeros((40, 40)), 'type_map': np.zeros((40, 40))})
  summary = build_data.build('consep', str(tmp_path / 'tfds'), str(raw), 'original')
  text = caplog.text
  assert 'RGBA image, alpha channel dropped' in text
  assert 'inst_type has 5 rows but inst_map has 2 instances' in text
  assert '1 instance(s) with mixed types' in text
  assert 'renumbered 2 instances' in text
  assert summary['splits']['train']['empty_tiles'] == 1
  src = input_pipeline.open_source('consep', str(tmp_path / 'tfds'), 'original', 'train')
  ex = [src[i] for i in range(len(src)) if src[i]['name'] == b'train_2'][0]
  assert ex['image'].shape == (40, 40, 3)
  assert set(np.unique(ex['inst_map'])) == {0, 1, 2}
  np.testing.assert_array_equal(np.unique(ex['type_map'][ex['inst_map'] == 1]), [2])


def test_rebuild_after_fixing_a_bad_file(tmp_path):
  raw = tmp_path / 'raw'
  make_dataset(raw, raw_ids=np.arange(1, 8))
  bad = raw / 'Test' / 'Images' / 'test_2.png'
  good = bad.read_bytes()
  bad.write_bytes(b'garbage')
  _expect_error(tmp_path, 'cannot read image')
  bad.write_bytes(good)
  summary = build_data.build('consep', str(tmp_path / 'tfds'), str(raw), 'original')
  assert summary['splits']['test']['tiles'] == 2


def test_demo_set_is_deterministic_and_imbalanced(tmp_path):
  s1 = build_data.build('demo_nuclei', str(tmp_path / 'a'))
  s2 = build_data.build('demo_nuclei', str(tmp_path / 'b'))
  assert s1['splits'] == s2['splits']
  train = s1['splits']['train']
  assert train['tiles'] == 32 and s1['splits']['test']['tiles'] == 8
  counts = {int(c): n for c, n in train['nuclei_per_class'].items()}
  test = {int(c): n for c, n in s1['splits']['test']['nuclei_per_class'].items()}
  # The summary counts what the generator drew: each nucleus by its majority type, recounted here.
  assert counts == _generated_counts('train', 32) and test == _generated_counts('test', 8)
  # Measured: train 21 / 484 / 361 / 463 (other 1.6 %, one rare class like CoNSeP's "other" at
  # ~2 %); test 77 / 145 / 128 / 106, enriched in the rare class (>= 60 rare nuclei to measure its
  # F_c). The generator is seeded: these are its numbers on every machine.
  assert counts == {1: 21, 2: 484, 3: 361, 4: 463} and test == {1: 77, 2: 145, 3: 128, 4: 106}
  assert 'test is enriched in the rare class' in build_data.format_summary(s1)
  a = input_pipeline.open_source('demo_nuclei', str(tmp_path / 'a'), 'merged', 'train')[5]
  b = input_pipeline.open_source('demo_nuclei', str(tmp_path / 'b'), 'merged', 'train')[5]
  np.testing.assert_array_equal(a['image'], b['image'])
  np.testing.assert_array_equal(a['inst_map'], b['inst_map'])
  from tfds_builders.demo_nuclei import generate  # pylint: disable=g-import-not-at-top
  image, inst, _ = generate.make_tile(generate.SEED, 'train', 5)  # Stored as drawn (lossless).
  np.testing.assert_array_equal(a['image'], image)
  np.testing.assert_array_equal(a['inst_map'], inst)
  ids = np.unique(a['inst_map'])
  np.testing.assert_array_equal(ids, np.arange(ids.size))  # 0 and ids 1..N contiguous.


def test_png_bytes_decode_to_the_same_pixels_and_bad_images_are_named():
  import io  # pylint: disable=g-import-not-at-top
  from tfds_builders import tiles  # pylint: disable=g-import-not-at-top
  image = np.random.default_rng(0).integers(0, 256, (37, 41, 3), dtype=np.uint8)
  decoded = np.asarray(Image.open(io.BytesIO(tiles.png_bytes(image, 'x.png'))))
  np.testing.assert_array_equal(decoded, image)  # RGB order kept, nothing lost.
  for bad in (image.astype(np.float32), image[..., 0], np.zeros((4, 4, 4), np.uint8)):
    with pytest.raises(ValueError, match=r'tile_3\.png: image .*expected uint8 \[H, W, 3\]'):
      tiles.png_bytes(bad, 'tile_3.png')


def _generated_counts(split: str, tiles: int) -> dict[int, int]:
  """{class: nuclei} over the demo generator's tiles of `split`, by each nucleus's majority type."""
  from tfds_builders.demo_nuclei import generate as demo_tiles  # pylint: disable=g-import-not-at-top
  counts = {}
  for i in range(tiles):
    _, inst, types = demo_tiles.make_tile(demo_tiles.SEED, split, i)
    for k in np.unique(inst[inst > 0]):
      c = int(np.bincount(types[inst == k]).argmax())
      counts[c] = counts.get(c, 0) + 1
  return dict(sorted(counts.items()))


@pytest.mark.slow
def test_build_data_cli(tmp_path):
  """The CLI builds a set, prints its summary and the input pipeline reads it back. (Real CoNSeP
  is built through `main` by tests/e2e/consep_smoke_test.py, which checks its tile and class counts.)"""
  out = subprocess.run(
      [sys.executable, '-m', 'diffmix_jax.build_data', '--dataset', 'demo_nuclei',
       '--data_dir', str(tmp_path / 'tfds')],
      cwd=ROOT, capture_output=True, text=True, timeout=HANG_TIMEOUT, check=True)
  summary = json.loads(out.stdout[out.stdout.index('{'):])
  assert summary['splits']['train']['tiles'] == 32 and summary['splits']['test']['tiles'] == 8
  src = input_pipeline.open_source('demo_nuclei', str(tmp_path / 'tfds'), 'merged', 'train')
  ds = input_pipeline.train_dataset(src, crop_size=48, global_batch=4, seed=0)
  batch = ds[0]
  assert batch['image'].shape == (4, 48, 48, 3) and batch['image'].dtype == np.float32
  assert -1.0 <= batch['image'].min() and batch['image'].max() <= 1.0
  assert batch['type_map'].max() <= 4
  test = input_pipeline.open_source('demo_nuclei', str(tmp_path / 'tfds'), 'merged', 'test')
  names = [test[i]['name'] for i in range(len(test))]
  assert [n.decode() if isinstance(n, bytes) else n for n in names] == [
      f'test_{i}' for i in range(1, 9)]
