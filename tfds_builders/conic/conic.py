"""TFDS builder for CoNIC (Graham et al. 2021; the Lizard colon nuclei cut into 256x256 patches).

Release layout (manual_dir): `images.npy` uint8 [N, H, W, 3], `labels.npy` integer [N, H, W, 2]
(channel 0 instance ids, channel 1 class ids 0-6: background, neutrophil, epithelial, lymphocyte,
plasma, eosinophil, connective) and `patch_info.csv`, one row per patch `<source image>-<index>`
(`consep_1-0000`; the source image's cohort is the part before `_`). The arrays are read
memory-mapped, one patch at a time (the labels alone are several GB).

CoNIC has no test split: the builder draws one by source image (no image on both sides), stratified
by cohort, from `split_seed`, and records it in `info.metadata['split']`. Cohorts can be left out by
name (`exclude`), e.g. `consep` so that a CoNSeP test set stays unseen.
"""

import dataclasses
import logging
import pathlib
import re
import zlib

import numpy as np
import tensorflow_datasets as tfds

from tfds_builders import class_tables
from tfds_builders import raw_folders
from tfds_builders import tiles

FILES = ('images.npy', 'labels.npy', 'patch_info.csv')
_ROW = re.compile(r'^([A-Za-z0-9]+)_([^-]*)-(\d+)$')  # cohort _ image - index


@dataclasses.dataclass
class ConicConfig(tfds.core.BuilderConfig):
  """Which cohorts are left out and how the test split is drawn."""
  exclude: tuple[str, ...] = ()
  test_fraction: float = 0.2
  split_seed: int = 0


def config_for(exclude=(), test_fraction: float = 0.2, split_seed: int = 0) -> ConicConfig:
  """The builder config of these settings; its name (the built dataset's folder) spells them."""
  exclude = tuple(sorted(set(exclude)))
  if not 0 < test_fraction < 1:
    raise ValueError(f'conic test_fraction must be in (0, 1); got {test_fraction}')
  name = f'test{test_fraction:g}_seed{split_seed}' + ''.join(f'_no{c}' for c in exclude)
  return ConicConfig(name=name, exclude=exclude, test_fraction=test_fraction,
                     split_seed=split_seed, description='split by source image, by cohort')


def read_rows(path: pathlib.Path) -> list[str]:
  """The patch names of `patch_info.csv` (a header row, if any, is skipped).

  Raises:
    raw_folders.DatasetError: a row that is not `<cohort>_<image>-<index>` (line named).
  """
  try:
    lines = [ln.strip().strip('"') for ln in path.read_text().splitlines()]
  except (OSError, UnicodeDecodeError) as e:
    raise raw_folders.DatasetError(f'cannot read {path}: {e}') from e
  if lines and re.fullmatch(r'[A-Za-z_ ]+', lines[0]):
    lines = lines[1:]  # The header (a word such as patch_info).
  rows = [ln for ln in lines if ln]
  for i, row in enumerate(rows):
    if not _ROW.match(row):
      raise raw_folders.DatasetError(f'{path}: row {i + 1} is {row!r}; expected '
                                     '<cohort>_<image>-<index> such as consep_1-0000')
  if len(set(rows)) != len(rows):
    raise raw_folders.DatasetError(f'{path}: a patch name appears twice')
  return rows


def split_sources(rows: list[str], test_fraction: float, seed: int, exclude=()) -> dict:
  """Draws the test source images: per cohort, round(test_fraction * images), at least one and
  never all when the cohort has two or more. Each cohort draws from its own stream (seed, cohort),
  so leaving a cohort out does not change the others' split.

  Returns:
    {'train': [source], 'test': [source], 'excluded': [cohort]} (sources in natural order).

  Raises:
    raw_folders.DatasetError: an unknown cohort to leave out, or a split left empty (the images per
      cohort are named).
  """
  sources = sorted({_ROW.match(r).group(1) + '_' + _ROW.match(r).group(2) for r in rows},
                   key=raw_folders.natural_key)
  cohorts = sorted({s.split('_', 1)[0] for s in sources})
  unknown = sorted(set(exclude) - set(cohorts))
  if unknown:
    raise raw_folders.DatasetError(f'cohort(s) {unknown} to leave out are not in patch_info.csv; '
                                   f'its cohorts are {cohorts}')
  out = {'train': [], 'test': [], 'excluded': sorted(exclude)}
  per_cohort = {}
  for cohort in cohorts:
    mine = [s for s in sources if s.split('_', 1)[0] == cohort]
    per_cohort[cohort] = len(mine)
    if cohort in exclude:
      continue
    rng = np.random.default_rng([seed, zlib.crc32(cohort.encode())])
    n_test = min(max(int(round(test_fraction * len(mine))), 1), len(mine) - 1) if len(
        mine) > 1 else 0
    test = set(rng.permutation(len(mine))[:n_test].tolist())
    for i, s in enumerate(mine):
      out['test' if i in test else 'train'].append(s)
  for split in ('train', 'test'):
    if not out[split]:
      raise raw_folders.DatasetError(
          f'the {split} split would be empty: source images per cohort {per_cohort}, left out '
          f'{sorted(exclude) or "none"}; a cohort gives test images only when it has two or more')
    out[split].sort(key=raw_folders.natural_key)
  return out


def open_arrays(root: pathlib.Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """Memory-maps images.npy and labels.npy and reads patch_info.csv; checks shapes and dtypes."""
  for f in FILES:
    if not (root / f).is_file():
      raise raw_folders.DatasetError(f'missing {root / f}: expected the CoNIC release files '
                                     f'{", ".join(FILES)} in {root}')
  arrays = []
  for f in FILES[:2]:
    try:
      arrays.append(np.load(root / f, mmap_mode='r', allow_pickle=False))
    except Exception as e:  # ValueError, OSError for corrupt or pickled files.
      raise raw_folders.DatasetError(f'cannot read {root / f}: {e}') from e
  images, labels = arrays
  if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
    raise raw_folders.DatasetError(f'{root / FILES[0]}: {images.dtype} {images.shape}; expected '
                                   'uint8 [N, H, W, 3]')
  if labels.shape != images.shape[:3] + (2,) or not np.issubdtype(labels.dtype, np.integer):
    raise raw_folders.DatasetError(f'{root / FILES[1]}: {labels.dtype} {labels.shape}; expected '
                                   f'integer {list(images.shape[:3]) + [2]} (instance ids, class ids)')
  rows = read_rows(root / FILES[2])
  if len(rows) != len(images):
    raise raw_folders.DatasetError(f'{root / FILES[2]}: {len(rows)} rows for {len(images)} patches '
                                   f'in {FILES[0]}; expected one row per patch')
  return images, labels, rows


class Conic(tfds.core.GeneratorBasedBuilder):
  """CoNIC patches in its 6 classes (+ background), split by source image."""
  VERSION = tiles.VERSION
  BUILDER_CONFIGS = [config_for()]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download the CoNIC challenge's patch release and pass the folder that holds
    <manual_dir>/images.npy       uint8 [N, 256, 256, 3]
    <manual_dir>/labels.npy       [N, 256, 256, 2]: instance ids, class ids 0-6
    <manual_dir>/patch_info.csv   one row per patch, <source image>-<index>
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return tiles.info_with_metadata(self)

  def _split_generators(self, dl_manager):
    root = pathlib.Path(dl_manager.manual_dir)
    images, labels, rows = open_arrays(root)
    cfg = self.builder_config
    split = split_sources(rows, cfg.test_fraction, cfg.split_seed, cfg.exclude)
    self.info.metadata.update(classes=class_tables.CONIC.to_json(),
                              split=dict(split, seed=cfg.split_seed,
                                         test_fraction=cfg.test_fraction))
    side = {s: k for k in ('train', 'test') for s in split[k]}
    index = {k: [i for i, r in enumerate(rows) if side.get(r.rsplit('-', 1)[0]) == k]
             for k in ('train', 'test')}
    return {k: self._generate_examples(root, rows, index[k]) for k in ('train', 'test')}

  def _generate_examples(self, root, rows, indices):
    images, labels, _ = open_arrays(root)
    scheme = raw_folders.Scheme(None, class_tables.CONIC.num_classes - 1,
                                'CoNIC class ids (channel 1)')
    for i in indices:
      where = f'{root / FILES[1]} patch {i} ({rows[i]})'
      inst, types, warnings = raw_folders.clean_maps(
          raw_folders.integer_ids(labels[i, ..., 0], 'channel 0 (instance ids)', where),
          raw_folders.integer_ids(labels[i, ..., 1], 'channel 1 (class ids)', where),
          scheme, rows[i], where, note_renumbering=False)
      for w in warnings:
        logging.warning('%s', w)
      image = tiles.png_bytes(np.array(images[i]), f'{root / FILES[0]} patch {i} ({rows[i]})')
      yield rows[i], {'image': image, 'inst_map': inst, 'type_map': types, 'name': rows[i]}
