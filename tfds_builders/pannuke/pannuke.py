"""TFDS builder for PanNuke (Gamper et al. 2019/2020): 19 tissues, 5 classes, 256x256 patches, 3 folds.

Release layout (manual_dir), for k in 1, 2, 3:
  `Fold {k}/images/fold{k}/images.npy`  float [N, H, W, 3], values 0..255
  `Fold {k}/images/fold{k}/types.npy`   str [N], the tissue of each patch
  `Fold {k}/masks/fold{k}/masks.npy`    float [N, H, W, 6]: channels 0-4 instance ids of neoplastic,
                                        inflammatory, connective, dead, epithelial; 5 background
Instance ids repeat across channels, so each patch is relabelled to unique ids (channel c -> class
c + 1). One fold's masks are ~8 GB of float64: every array is read memory-mapped, patch by patch.
The splits are folds (builder config; default folds 1 + 2 train, 3 test); the tissue is kept per
patch as the feature `tissue` (PanNuke's mPQ/bPQ per tissue).
"""

import dataclasses
import logging
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from tfds_builders import class_tables
from tfds_builders import raw_folders
from tfds_builders import tiles

NUM_CLASS_CHANNELS = 5
FOLDS = (1, 2, 3)


@dataclasses.dataclass
class PannukeConfig(tfds.core.BuilderConfig):
  """Which folds make the train and the test split."""
  train_folds: tuple[int, ...] = (1, 2)
  test_folds: tuple[int, ...] = (3,)


def config_for(train_folds=(1, 2), test_folds=(3,)) -> PannukeConfig:
  """The builder config of these folds (name `train12_test3`)."""
  train_folds, test_folds = tuple(sorted(set(train_folds))), tuple(sorted(set(test_folds)))
  if (not train_folds or not test_folds or set(train_folds) & set(test_folds)
      or not set(train_folds + test_folds) <= set(FOLDS)):
    raise ValueError(f'pannuke folds: train {train_folds} and test {test_folds} must be non-empty, '
                     f'disjoint subsets of {FOLDS}')
  name = 'train' + ''.join(map(str, train_folds)) + '_test' + ''.join(map(str, test_folds))
  return PannukeConfig(name=name, train_folds=train_folds, test_folds=test_folds,
                       description='splits by fold')


def fold_paths(root: pathlib.Path, k: int) -> dict[str, pathlib.Path]:
  """The three files of fold k."""
  return {'images': root / f'Fold {k}' / 'images' / f'fold{k}' / 'images.npy',
          'types': root / f'Fold {k}' / 'images' / f'fold{k}' / 'types.npy',
          'masks': root / f'Fold {k}' / 'masks' / f'fold{k}' / 'masks.npy'}


def open_fold(root: pathlib.Path, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Memory-maps fold k's images and masks and reads its tissue names; checks shapes and dtypes."""
  paths = fold_paths(root, k)
  arrays = {}
  for key, path in paths.items():
    if not path.is_file():
      raise raw_folders.DatasetError(f'missing {path}: expected the PanNuke release layout '
                                     f'Fold {k}/images/fold{k}/{{images,types}}.npy and '
                                     f'Fold {k}/masks/fold{k}/masks.npy under {root}')
    try:
      arrays[key] = np.load(path, mmap_mode='r' if key != 'types' else None, allow_pickle=False)
    except Exception as e:  # ValueError (pickled object arrays), OSError for corrupt files.
      raise raw_folders.DatasetError(f'cannot read {path}: {e}') from e
  images, types, masks = arrays['images'], arrays['types'], arrays['masks']
  if images.ndim != 4 or images.shape[-1] != 3 or not np.issubdtype(images.dtype, np.number):
    raise raw_folders.DatasetError(f'{paths["images"]}: {images.dtype} {images.shape}; expected '
                                   'float [N, H, W, 3] with values 0..255')
  if masks.shape != images.shape[:3] + (NUM_CLASS_CHANNELS + 1,) or not np.issubdtype(
      masks.dtype, np.number):
    raise raw_folders.DatasetError(f'{paths["masks"]}: {masks.dtype} {masks.shape}; expected '
                                   f'{list(images.shape[:3]) + [6]} (5 class channels of instance '
                                   'ids, then background)')
  if types.shape != images.shape[:1] or types.dtype.kind not in 'US':
    raise raw_folders.DatasetError(f'{paths["types"]}: {types.dtype} {types.shape}; expected '
                                   f'{len(images)} tissue names (strings)')
  return images, types, masks


def patch_image(images: np.ndarray, i: int, where: str) -> np.ndarray:
  """Patch i as uint8 [H, W, 3] (PanNuke stores 0..255 as floats)."""
  x = np.asarray(images[i], np.float64)
  if not np.all(np.isfinite(x)) or x.min() < 0 or x.max() > 255:
    raise raw_folders.DatasetError(f'{where}: values outside 0..255 (min {x.min()}, max '
                                   f'{x.max()}); expected RGB 0..255')
  return np.round(x).astype(np.uint8)


def patch_maps(masks: np.ndarray, i: int, where: str) -> tuple[np.ndarray, np.ndarray, int]:
  """Patch i's instances with unique ids and their classes.

  Returns:
    (inst int32 [H, W] unique ids over the channels, types int32 [H, W] channel + 1, number of
    pixels claimed by two channels: the first channel keeps them).
  """
  m = masks[i]
  inst = np.zeros(m.shape[:2], np.int32)
  types = np.zeros(m.shape[:2], np.int32)
  overlap, offset = 0, 0
  for c in range(NUM_CLASS_CHANNELS):
    ids = raw_folders.integer_ids(m[..., c], f'channel {c} (instance ids)', where)
    values, dense = np.unique(ids, return_inverse=True)  # Ids 1..n of this channel, any values.
    dense = dense.reshape(ids.shape) + (0 if values[0] == 0 else 1)
    free = (ids > 0) & (inst == 0)
    overlap += int(np.count_nonzero((ids > 0) & (inst > 0)))
    inst[free] = dense[free] + offset
    types[free] = c + 1
    offset += int(np.count_nonzero(values))
  return inst, types, overlap


class Pannuke(tfds.core.GeneratorBasedBuilder):
  """PanNuke patches in its 5 classes (+ background) with their tissue; splits by fold."""
  VERSION = tiles.VERSION
  BUILDER_CONFIGS = [config_for()]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download PanNuke's three folds, unzip them side by side and pass the folder that holds
    <manual_dir>/Fold 1/images/fold1/images.npy, types.npy
    <manual_dir>/Fold 1/masks/fold1/masks.npy
    <manual_dir>/Fold 2/..., <manual_dir>/Fold 3/...
  Only the folds of the chosen split need to be present.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return tiles.info_with_metadata(self, tissue=tfds.features.Text())

  def _split_generators(self, dl_manager):
    root = pathlib.Path(dl_manager.manual_dir)
    cfg = self.builder_config
    for k in cfg.train_folds + cfg.test_folds:  # Every fold checked before anything is written.
      open_fold(root, k)
    self.info.metadata.update(classes=class_tables.PANNUKE.to_json(),
                              split={'train_folds': list(cfg.train_folds),
                                     'test_folds': list(cfg.test_folds)})
    return {'train': self._generate_examples(root, cfg.train_folds),
            'test': self._generate_examples(root, cfg.test_folds)}

  def _generate_examples(self, root, folds):
    scheme = raw_folders.Scheme(None, NUM_CLASS_CHANNELS, 'PanNuke classes')
    for k in folds:
      images, tissues, masks = open_fold(root, k)
      paths = fold_paths(root, k)
      for i in range(len(images)):
        name = f'fold{k}_{i + 1}'
        where = f'{paths["masks"]} patch {i}'
        inst, types, overlap = patch_maps(masks, i, where)
        inst, types, warnings = raw_folders.clean_maps(inst, types, scheme, name, where,
                                                       note_renumbering=False)
        if overlap:
          warnings.append(f'{name}: {overlap} pixels in two class channels; the first kept')
        for w in warnings:
          logging.warning('%s', w)
        where = f'{paths["images"]} patch {i}'
        yield name, {'image': tiles.png_bytes(patch_image(images, i, where), where),
                     'inst_map': inst, 'type_map': types, 'name': name,
                     'tissue': str(tissues[i])}
