"""Tests of the nuclei_folder, CoNIC and PanNuke builders on files written here in each release's
own layout (small N): counts, ids, splits, metadata, and the errors that name file and field."""

import json
import pathlib

import numpy as np
from PIL import Image
import pytest
import scipy.io

from configs import common
from diffmix_jax import config_checks
from diffmix_jax.data import datasets
from diffmix_jax.data import input_pipeline
from diffmix_jax.stages import build_data
from tfds_builders import class_tables
from tfds_builders import raw_folders
from tfds_builders.conic import conic
from tfds_builders.pannuke import pannuke

# A few square nuclei per 32-px patch: (y, x, side, class).
NUCLEI = ((2, 2, 6, 1), (2, 14, 7, 2), (14, 3, 8, 3), (16, 18, 9, 2))


def _maps(classes, size=32, first_id=1):
  """(inst, types) int32 [size, size] with the NUCLEI squares, class of nucleus k = classes[k]."""
  inst = np.zeros((size, size), np.int32)
  types = np.zeros((size, size), np.int32)
  for k, ((y, x, s, _), c) in enumerate(zip(NUCLEI, classes)):
    inst[y:y + s, x:x + s] = first_id + k
    types[y:y + s, x:x + s] = c
  return inst, types


def write_conic(root, rows, classes_of, size=32, dtype=np.int32):
  """images.npy, labels.npy (instance ids from 7, as cut patches have) and patch_info.csv."""
  root.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (len(rows), size, size, 3), dtype=np.uint8)
  labels = np.stack([np.stack(_maps(classes_of(i), size, first_id=7), -1) for i in range(len(rows))])
  np.save(root / 'images.npy', images)
  np.save(root / 'labels.npy', labels.astype(dtype))
  (root / 'patch_info.csv').write_text('patch_info\n' + '\n'.join(rows) + '\n')
  return images, labels


ROWS = ['consep_1-0000', 'consep_1-0001', 'consep_2-0000', 'crag_1-0000', 'crag_2-0000',
        'crag_3-0000', 'crag_3-0001', 'glas_1-0000', 'glas_2-0000']


def test_conic_split_by_source_image_counts_and_metadata(tmp_path):
  write_conic(tmp_path / 'raw', ROWS, lambda i: (1, 2, 6, 5) if i % 2 else (3, 4, 2, 6))
  summary = build_data.build('conic', str(tmp_path / 'tfds'), str(tmp_path / 'raw'),
                             exclude=('glas',), test_fraction=0.4, split_seed=3)
  split = summary['split']
  assert split['excluded'] == ['glas'] and split['seed'] == 3
  assert not set(split['train']) & set(split['test'])
  # Per cohort round(0.4 * n) test images, at least one, never all: consep 1 of 2, crag 1 of 3.
  assert sorted(s.split('_')[0] for s in split['test']) == ['consep', 'crag']
  assert len(split['train']) == 3
  names = {k: [input_pipeline._tile_name(e) for e in input_pipeline.open_source(
      'conic', str(tmp_path / 'tfds'), 'original', k, exclude=('glas',), test_fraction=0.4,
      split_seed=3)] for k in ('train', 'test')}
  for k in ('train', 'test'):
    assert {n.rsplit('-', 1)[0] for n in names[k]} == set(split[k])
  assert len(names['train']) + len(names['test']) == 7  # glas left out.
  n, odd = len(names['train']), sum(ROWS.index(n) % 2 for n in names['train'])
  want = {1: odd, 2: n, 3: n - odd, 4: n - odd, 5: odd, 6: n}  # Odd rows 1, 2, 6, 5; even 3, 4, 2, 6.
  assert summary['splits']['train']['nuclei_per_class'] == {str(c): k for c, k in want.items() if k}
  assert summary['classes'] == class_tables.CONIC.to_json()
  ex = input_pipeline.open_source('conic', str(tmp_path / 'tfds'), 'original', 'train',
                                  exclude=('glas',), test_fraction=0.4, split_seed=3)[0]
  assert sorted(np.unique(ex['inst_map']).tolist()) == [0, 1, 2, 3, 4]  # 7..10 renumbered.
  # The same seed draws the same split; the arrays are memory-mapped, never read whole.
  again = conic.split_sources(conic.read_rows(tmp_path / 'raw' / 'patch_info.csv'), 0.4, 3,
                              ('glas',))
  assert again == {k: split[k] for k in ('train', 'test', 'excluded')}
  images, labels, _ = conic.open_arrays(tmp_path / 'raw')
  assert isinstance(images, np.memmap) and isinstance(labels, np.memmap)


@pytest.mark.parametrize('case,match', [
    ('images_dtype', r'images\.npy: float32 .*expected uint8 \[N, H, W, 3\]'),
    ('labels_shape', r'labels\.npy: int32 \(9, 32, 32, 1\); expected integer'),
    ('class_7', r'labels\.npy patch 4 \(crag_2-0000\): class ids \[7\] are outside'),
    ('rows', r'patch_info\.csv: 8 rows for 9 patches'),
    ('bad_row', r'patch_info\.csv: row 3 is .consep2.; expected <cohort>_<image>-<index>'),
    ('unknown_cohort', r"cohort\(s\) \['lizard'\] to leave out are not in patch_info\.csv"),
])
def test_conic_bad_input_names_file_and_field(tmp_path, case, match):
  raw = tmp_path / 'raw'
  images, labels = write_conic(raw, ROWS, lambda i: (1, 2, 3, 4))
  if case == 'images_dtype':
    np.save(raw / 'images.npy', images.astype(np.float32))
  elif case == 'labels_shape':
    np.save(raw / 'labels.npy', labels[..., :1])
  elif case == 'class_7':
    labels[4, 0, 0] = (99, 7)
    np.save(raw / 'labels.npy', labels)
  elif case == 'rows':
    (raw / 'patch_info.csv').write_text('\n'.join(ROWS[:8]) + '\n')
  elif case == 'bad_row':
    (raw / 'patch_info.csv').write_text('\n'.join(ROWS[:2] + ['consep2'] + ROWS[3:]) + '\n')
  options = {'exclude': ('lizard',)} if case == 'unknown_cohort' else {}
  with pytest.raises(raw_folders.DatasetError, match=match):
    build_data.build('conic', str(tmp_path / 'tfds'), str(raw), **options)


def write_pannuke_fold(root, k, tissues, size=32):
  """Fold k as released: float64 images and masks; ids 1.. restart in every class channel."""
  folder = root / f'Fold {k}'
  (folder / 'images' / f'fold{k}').mkdir(parents=True)
  (folder / 'masks' / f'fold{k}').mkdir(parents=True)
  n = len(tissues)
  images = np.random.default_rng(k).integers(0, 256, (n, size, size, 3)).astype(np.float64)
  masks = np.zeros((n, size, size, 6))
  for i in range(n):
    for y, x, s, c in NUCLEI:  # Channel c - 1 holds class c; ids repeat across channels.
      channel = (c + i) % 5
      masks[i, y:y + s, x:x + s, channel] = 1 + int(masks[i, ..., channel].max())
    masks[i, ..., 5] = (masks[i, ..., :5].sum(-1) == 0)
  np.save(folder / 'images' / f'fold{k}' / 'images.npy', images)
  np.save(folder / 'images' / f'fold{k}' / 'types.npy', np.array(tissues))
  np.save(folder / 'masks' / f'fold{k}' / 'masks.npy', masks)
  return images, masks


def test_pannuke_folds_unique_ids_classes_and_tissue(tmp_path):
  raw = tmp_path / 'raw'
  write_pannuke_fold(raw, 1, ['Breast', 'Colon', 'Breast'])
  images2, masks2 = write_pannuke_fold(raw, 3, ['Lung', 'Colon'])
  summary = build_data.build('pannuke', str(tmp_path / 'tfds'), str(raw), train_folds=(1,),
                             test_folds=(3,))
  assert summary['split'] == {'train_folds': [1], 'test_folds': [3]}
  assert [summary['splits'][k]['tiles'] for k in ('train', 'test')] == [3, 2]
  assert summary['splits']['train']['nuclei'] == 12 and summary['classes'] == (
      class_tables.PANNUKE.to_json())
  config = common.base_config()
  config.data.name = 'pannuke'
  config.data.data_dir = str(tmp_path / 'tfds')
  config.data.pannuke.train_folds, config.data.pannuke.test_folds = (1,), (3,)
  test = input_pipeline.load_split(config, str(tmp_path), 'test')
  assert [(t['name'], t['tissue']) for t in test] == [('fold3_1', 'Lung'), ('fold3_2', 'Colon')]
  np.testing.assert_array_equal(test[1]['image'], images2[1].astype(np.uint8))
  inst, types = test[1]['inst_map'], test[1]['type_map']
  assert inst.max() == 4  # Two nuclei with id 1 in different channels became two instances.
  for (y, x, _, c), k in zip(NUCLEI, range(4)):
    assert types[y, x] == (c + 1) % 5 + 1 and inst[y, x] > 0  # Channel -> class channel + 1.
  assert len({int(inst[y, x]) for y, x, _, _ in NUCLEI}) == 4
  with pytest.raises(raw_folders.DatasetError, match=r'missing .*Fold 2/images/fold2/images\.npy'):
    build_data.build('pannuke', str(tmp_path / 'tfds2'), str(raw), train_folds=(1, 2),
                     test_folds=(3,))
  np.save(raw / 'Fold 3' / 'masks' / 'fold3' / 'masks.npy', masks2[..., :5])
  with pytest.raises(raw_folders.DatasetError, match=r'masks\.npy: float64 \(2, 32, 32, 5\); '
                     r'expected \[2, 32, 32, 6\]'):
    build_data.build('pannuke', str(tmp_path / 'tfds3'), str(raw), train_folds=(1,),
                     test_folds=(3,))


def write_folder(root, classes, tiles):
  """A nuclei_folder: classes.json and {split: [(name, suffix, label kind, source classes)]}."""
  root.mkdir(parents=True)
  (root / 'classes.json').write_text(json.dumps(classes))
  rng = np.random.default_rng(0)
  for split, items in tiles.items():
    folder = root / raw_folders.SPLIT_FOLDERS[split]
    (folder / 'Images').mkdir(parents=True)
    (folder / 'Labels').mkdir(parents=True)
    for name, suffix, kind, source in items:
      Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(
          folder / 'Images' / f'{name}{suffix}')
      inst, types = (np.pad(m, ((0, 0), (0, 8))) for m in _maps(source))
      if kind == 'npy':
        np.save(folder / 'Labels' / f'{name}.npy', np.stack([inst, types], -1).astype(np.uint16))
      else:  # inst_type only (no type_map): the class of ids 1..N.
        scipy.io.savemat(folder / 'Labels' / f'{name}.mat',
                         {'inst_map': inst.astype(float),
                          'inst_type': np.array(source, float)[:, None]})


FOLDER_CLASSES = {'names': ['background', 'tumour', 'immune', 'stroma'],
                  'merge': {'0': 0, '1': 1, '2': 2, '3': 2, '4': 3, '5': 3}, 'rare': [2],
                  'common': [1, 3]}


def test_nuclei_folder_classes_json_merge_mat_and_npy(tmp_path, monkeypatch):
  write_folder(tmp_path / 'raw', FOLDER_CLASSES, {
      'train': [('a_1', '.png', 'mat', (1, 4, 5, 4)), ('a_2', '.jpg', 'npy', (3, 1, 4, 5))],
      'test': [('b_1', '.tif', 'npy', (1, 2, 3, 4))]})
  summary = build_data.build('nuclei_folder', str(tmp_path / 'tfds'), str(tmp_path / 'raw'))
  # Source ids merged by the table: 1 -> 1, 2, 3 -> 2, 4, 5 -> 3.
  assert summary['splits']['train']['nuclei_per_class'] == {'1': 2, '2': 1, '3': 5}
  assert summary['splits']['test']['nuclei_per_class'] == {'1': 1, '2': 2, '3': 1}
  assert summary['classes'] == class_tables.parse(FOLDER_CLASSES).to_json()
  table = build_data.format_summary(summary)
  assert 'immune*' in table and '2 (25.0%)' in table and 'common: tumour, stroma' in table
  # A config that leaves its classes to the table gets them from the folder at start.
  config = importlib_config('folder_example')
  config.data.manual_dir = str(tmp_path / 'raw')
  config.stages = 'build_data,mix_labels'
  datasets.resolve_classes(config, str(tmp_path / 'w'))  # As main does, before the checks.
  config_checks.check(config, str(tmp_path / 'w'))
  assert (config.data.num_classes, config.diffusion.model.num_classes,
          config.mix.balance.rare_classes) == (4, 4, (2,))
  config.data.num_classes = 5
  with pytest.raises(ValueError, match=r'num_classes=5: must be 4, the class count of the '
                     r'nuclei_folder class table \(background, tumour, immune, stroma\)'):
    config_checks.check(config, str(tmp_path / 'w'))


def importlib_config(name):
  import importlib  # pylint: disable=g-import-not-at-top
  return importlib.import_module(f'configs.{name}').get_config()


@pytest.mark.parametrize('case,match', [
    ('no_table', r'classes\.json: missing; a nuclei_folder dataset describes its classes there'),
    ('rare_and_common', r'classes\.json: class 2 is both rare and common'),
    ('unlisted_source_id', r'a_1\.mat: class ids \[6\] are outside the "merge" source ids'),
    ('inst_type_rows', r'a_1\.mat: inst_type has 3 rows but inst_map ids reach 4'),
    ('npy_shape', r'a_2\.npy: shape \(32, 40\); expected \[H, W, 2\]'),
])
def test_nuclei_folder_bad_input_names_file_and_field(tmp_path, case, match):
  classes = dict(FOLDER_CLASSES, common=[1, 2, 3]) if case == 'rare_and_common' else FOLDER_CLASSES
  raw = tmp_path / 'raw'
  write_folder(raw, classes, {'train': [('a_1', '.png', 'mat', (1, 6 if case ==
                                                                'unlisted_source_id' else 2, 3, 4)),
                                        ('a_2', '.png', 'npy', (1, 2, 3, 4))],
                              'test': [('b_1', '.png', 'npy', (1, 2, 3, 4))]})
  if case == 'no_table':
    (raw / 'classes.json').unlink()
  elif case == 'inst_type_rows':
    mat = scipy.io.loadmat(raw / 'Train' / 'Labels' / 'a_1.mat')
    scipy.io.savemat(raw / 'Train' / 'Labels' / 'a_1.mat',
                     {'inst_map': mat['inst_map'], 'inst_type': mat['inst_type'][:3]})
  elif case == 'npy_shape':
    np.save(raw / 'Train' / 'Labels' / 'a_2.npy', np.zeros((32, 40), np.int32))
  with pytest.raises(ValueError, match=match):
    build_data.build('nuclei_folder', str(tmp_path / 'tfds'), str(raw))


def test_conic_split_streams_per_cohort_and_empty_split_is_an_error():
  rows = [f'{c}_{i}-0000' for c in ('consep', 'crag', 'dpath') for i in range(1, 11)]
  kept = conic.split_sources(rows, 0.2, 0)
  without = conic.split_sources(rows, 0.2, 0, ('consep',))
  # Leaving consep out leaves the other cohorts' draws as they were.
  assert [s for s in kept['test'] if not s.startswith('consep')] == without['test']
  assert len(without['test']) == 4 and not set(without['test']) & set(without['train'])
  with pytest.raises(raw_folders.DatasetError, match=r"test split would be empty: source images "
                     r"per cohort \{'a': 1, 'b': 1\}"):
    conic.split_sources(['a_1-0000', 'b_1-0000', 'b_1-0001'], 0.2, 0)
  with pytest.raises(raw_folders.DatasetError, match=r"row 1 is 'consep1'"):
    conic.read_rows(_text_file('consep1\nconsep_1-0000\n'))


def _text_file(text):
  import tempfile  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(tempfile.mkdtemp()) / 'patch_info.csv'
  path.write_text(text)
  return path


def test_pannuke_relabel_takes_any_ids_without_overflow():
  masks = np.zeros((1, 8, 8, 6))
  masks[0, :2, :2, 3] = 2**31 - 10  # Ids near the int32 limit in two channels.
  masks[0, 4:, 4:, 4] = 2**31 - 2
  masks[0, :2, 4:, 4] = 20
  inst, types, overlap = pannuke.patch_maps(masks, 0, 'masks.npy patch 0')
  assert overlap == 0 and sorted(np.unique(inst).tolist()) == [0, 1, 2, 3]
  assert types[0, 0] == 4 and types[5, 5] == 5 and types[0, 5] == 5


def test_nuclei_folders_build_apart_and_a_changed_folder_is_not_reused(tmp_path):
  tiles = {split: [(f'{split}_1', '.png', 'npy', (1, 2, 3, 4))] for split in ('train', 'test')}
  write_folder(tmp_path / 'one', FOLDER_CLASSES, tiles)
  write_folder(tmp_path / 'two', dict(FOLDER_CLASSES, names=['background', 'a', 'b', 'c', 'd'],
                                      rare=[4], common=[1, 2, 3]), tiles)
  one = build_data.build('nuclei_folder', str(tmp_path / 'tfds'), str(tmp_path / 'one'))
  two = build_data.build('nuclei_folder', str(tmp_path / 'tfds'), str(tmp_path / 'two'))
  assert one['classes']['names'][1] == 'tumour' and two['classes']['names'][1] == 'a'
  (tmp_path / 'one' / 'classes.json').write_text(json.dumps(dict(FOLDER_CLASSES, rare=[3],
                                                                 common=[1, 2])))
  with pytest.raises(raw_folders.DatasetError, match=r'made before its files or classes\.json '
                     r'changed; delete that folder'):
    build_data.build('nuclei_folder', str(tmp_path / 'tfds'), str(tmp_path / 'one'))
  # A workdir built from the old table refuses the edited one as a run starts.
  config = importlib_config('folder_example')
  config.data.manual_dir = str(tmp_path / 'one')
  (tmp_path / 'w' / 'build_data').mkdir(parents=True)
  (tmp_path / 'w' / 'build_data' / 'summary.json').write_text(json.dumps(one))
  with pytest.raises(ValueError, match=r'classes\.json differs from the table this workdir was '
                     r'built with'):
    config_checks.check(config, str(tmp_path / 'w'))
  config.data.name = 'CoNSeP'  # The name is checked before any table is looked up.
  with pytest.raises(ValueError, match=r"config\.data\.name='CoNSeP': expected one of"):
    config_checks.check(config, str(tmp_path / 'w'))
  with pytest.raises(class_tables.ClassTableError, match=r'"rare" must hold at least one'):
    class_tables.parse(dict(FOLDER_CLASSES, rare=[]))
