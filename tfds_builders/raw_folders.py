"""Reading and validating a user's raw dataset folder (CoNSeP / GLySAC layout, datasets.md §1, §5).

Layout: `<root>/{Train,Test}/Images/<name>.{png,tif,tiff}` and `<root>/{Train,Test}/Labels/<name>.mat`
with `inst_map` and `type_map`. Every problem raises `DatasetError` naming the file and the expected
form; recoverable oddities (RGBA images, `inst_type` of the wrong length, mixed-type instances,
non-contiguous ids) are fixed and reported as warnings, never silently.
"""

import dataclasses
import logging
import pathlib
import re
from typing import Iterator

import numpy as np
from PIL import Image
import scipy.io

from tfds_builders import instances

# Raw class ids -> merged ids (hovernet.md §6.1-6.2, sdm.md §4.6). Background 0 stays 0.
# CoNSeP: 1 other; 2 inflammatory; 3, 4 -> 3 epithelial; 5, 6, 7 -> 4 spindle-shaped.
# GLySAC: {1, 2, 9, 10} -> 1; {4, 5, 6, 7} -> 2; {3, 8} -> 3.
_MERGES = {
    'consep': {0: 0, 1: 1, 2: 2, 3: 3, 4: 3, 5: 4, 6: 4, 7: 4},
    'glysac': {0: 0, 1: 1, 2: 1, 9: 1, 10: 1, 4: 2, 5: 2, 6: 2, 7: 2, 3: 3, 8: 3},
}
# Number of classes incl. background after the merge.
MERGED_NUM_CLASSES = {'consep': 5, 'glysac': 4}


def original_max_id(dataset: str) -> int:
  """Largest raw class id of `dataset` ('consep': 7, 'glysac': 10)."""
  return max(_MERGES[_check_dataset(dataset)])


def _check_dataset(dataset: str) -> str:
  if dataset not in _MERGES:
    raise ValueError(f'unknown dataset {dataset!r} for class merging; expected one of '
                     f'{sorted(_MERGES)}')
  return dataset


def merge_table(dataset: str) -> np.ndarray:
  """Lookup table raw id -> merged id.

  Args:
    dataset: 'consep' or 'glysac'.

  Returns:
    int32 [max_raw_id + 1]; `table[type_map]` merges a raw map.
  """
  merges = _MERGES[_check_dataset(dataset)]
  table = np.zeros(max(merges) + 1, np.int32)
  for raw, merged in merges.items():
    table[raw] = merged
  return table


def merge_classes(type_map: np.ndarray, dataset: str) -> np.ndarray:
  """Maps raw class ids to merged ids (the merge is applied once, never to merged maps).

  Args:
    type_map: integer [..., H, W] raw ids of `dataset`.
    dataset: 'consep' or 'glysac'.

  Returns:
    int32 [..., H, W] merged ids.

  Raises:
    ValueError: when a value is outside the raw scheme (names the values found).
  """
  table = merge_table(dataset)
  bad = np.setdiff1d(np.unique(type_map), np.arange(len(table)))
  if bad.size:
    raise ValueError(f'{dataset} raw class ids must be in 0..{len(table) - 1}; found '
                     f'{bad.tolist()}')
  return table[type_map.astype(np.int64)]



IMAGE_SUFFIXES = ('.png', '.tif', '.tiff')
SPLIT_FOLDERS = {'train': 'Train', 'test': 'Test'}


class DatasetError(ValueError):
  """A raw dataset file or folder is missing or not of the expected form."""


@dataclasses.dataclass
class Tile:
  """One validated tile: image uint8 [H, W, 3], inst_map int32 [H, W] (ids 1..N), type_map int32."""
  name: str
  image: np.ndarray
  inst_map: np.ndarray
  type_map: np.ndarray
  warnings: list[str]


def split_pairs(root: pathlib.Path, split: str) -> list[tuple[str, pathlib.Path, pathlib.Path]]:
  """Lists (name, image path, label path) of a split, sorted by name; checks the pairing.

  Raises:
    DatasetError: missing folder, or an image without its `.mat` (or the reverse).
  """
  folder = pathlib.Path(root) / SPLIT_FOLDERS[split]
  img_dir, lab_dir = folder / 'Images', folder / 'Labels'
  for d in (img_dir, lab_dir):
    if not d.is_dir():
      raise DatasetError(f'missing folder {d}: expected <root>/{{Train,Test}}/{{Images,Labels}}/ '
                         f'(images .png/.tif, labels .mat)')
  images = {}
  for p in img_dir.iterdir():
    if p.suffix.lower() in IMAGE_SUFFIXES:
      if p.stem in images:
        raise DatasetError(f'two images named {p.stem} in {img_dir}: {images[p.stem].name}, {p.name}')
      images[p.stem] = p
  mats = {p.stem: p for p in lab_dir.iterdir() if p.suffix.lower() == '.mat'}
  no_label = sorted(set(images) - set(mats))
  no_image = sorted(set(mats) - set(images))
  if no_label:
    raise DatasetError(f'image(s) without a label file in {lab_dir}: '
                       + ', '.join(f'{images[n].name} (expected {n}.mat)' for n in no_label))
  if no_image:
    raise DatasetError(f'label file(s) without an image in {img_dir}: '
                       + ', '.join(f'{n}.mat (expected {n}.png or {n}.tif)' for n in no_image))
  if not images:
    raise DatasetError(f'no images (.png/.tif) in {img_dir}')
  return [(n, images[n], mats[n]) for n in sorted(images, key=natural_key)]


def natural_key(name: str) -> list:
  """Sort key that orders train_2 before train_10: the order of tiles everywhere in the project."""
  return [int(s) if s.isdigit() else s for s in re.split(r'(\d+)', name)]


def read_image(path: pathlib.Path) -> tuple[np.ndarray, list[str]]:
  """Reads an RGB uint8 image; RGBA is converted (with a warning), grayscale is rejected.

  Returns:
    (uint8 [H, W, 3], warnings).
  """
  try:
    with Image.open(path) as im:
      im.load()
      mode = im.mode
      arr = np.asarray(im)
  except Exception as e:  # PIL raises many types for corrupt files.
    raise DatasetError(f'cannot read image {path}: {e}') from e
  warnings = []
  if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (1, 2)) or mode in ('L', 'LA', 'I', 'F',
                                                                               '1', 'P'):
    raise DatasetError(f'{path}: grayscale/palette image (mode {mode}, shape {arr.shape}); '
                       'expected RGB or RGBA')
  if arr.shape[-1] == 4:
    arr = arr[..., :3]
    warnings.append(f'{path.name}: RGBA image, alpha channel dropped')
  if arr.dtype != np.uint8:
    raise DatasetError(f'{path}: pixel dtype {arr.dtype}; expected 8-bit RGB')
  return np.ascontiguousarray(arr), warnings


def _integer_map(mat: dict, key: str, path: pathlib.Path) -> np.ndarray:
  if key not in mat:
    found = sorted(k for k in mat if not k.startswith('__'))
    raise DatasetError(f'{path}: no {key!r} in the .mat file (found {found}); expected keys '
                       "'inst_map' and 'type_map' (H x W integer maps)")
  a = np.asarray(mat[key])
  if a.ndim != 2:
    raise DatasetError(f'{path}: {key} has shape {a.shape}; expected a 2-D H x W map')
  if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)
          or a.dtype == bool):
    raise DatasetError(f'{path}: {key} has dtype {a.dtype}; expected integer ids')
  if np.issubdtype(a.dtype, np.floating):
    if not np.all(np.isfinite(a)) or np.any(a != np.round(a)):
      raise DatasetError(f'{path}: {key} holds non-integer values; expected integer ids')
  if a.size and a.min() < 0:
    raise DatasetError(f'{path}: {key} holds negative ids (min {a.min()}); expected ids >= 0')
  return a.astype(np.int32)


def read_labels(path: pathlib.Path, dataset: str, scheme: str
                ) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """Reads and validates a label `.mat`; merges classes when `scheme == 'original'`.

  Args:
    path: the `.mat` file.
    dataset: 'consep' or 'glysac' (selects the class scheme).
    scheme: 'original' (raw ids, merged here) or 'merged' (already merged ids).

  Returns:
    (inst_map int32 [H, W] ids 1..N contiguous, type_map int32 [H, W] merged, constant per instance;
    warnings).
  """
  try:
    mat = scipy.io.loadmat(str(path))
  except Exception as e:
    raise DatasetError(f'cannot read label file {path}: {e}') from e
  inst = _integer_map(mat, 'inst_map', path)
  types = _integer_map(mat, 'type_map', path)
  if inst.shape != types.shape:
    raise DatasetError(f'{path}: inst_map {inst.shape} and type_map {types.shape} differ in shape')
  max_id = original_max_id(dataset) if scheme == 'original' else (
      MERGED_NUM_CLASSES[dataset] - 1)
  bad = np.unique(types[types > max_id])
  if bad.size:
    hint = (' (use --labels original for raw class ids)' if scheme == 'merged' else '')
    raise DatasetError(f'{path}: class ids {bad.tolist()} are outside the {scheme} {dataset} scheme '
                       f'0..{max_id}{hint}')
  if scheme == 'original':
    types = merge_classes(types, dataset)
  warnings = []
  ids = np.unique(inst[inst > 0])
  if ids.size and (ids[0] != 1 or ids[-1] != ids.size):
    lut = np.zeros(inst.max() + 1, np.int32)
    lut[ids] = np.arange(1, ids.size + 1, dtype=np.int32)
    inst = lut[inst]
    warnings.append(f'{path.name}: instance ids were not 1..N; renumbered {ids.size} instances')
  types, mixed = _majority_types(inst, types)
  if mixed:
    warnings.append(f'{path.name}: {mixed} instance(s) with mixed types; took the majority type '
                    '(background only where it is the only value)')
  untyped = int(np.count_nonzero((types == 0) & (inst > 0)))
  if untyped:
    warnings.append(f'{path.name}: {untyped} nucleus pixels have type 0 (background)')
  if 'inst_type' in mat:
    n_type = np.asarray(mat['inst_type']).size
    if n_type != ids.size:
      warnings.append(f'{path.name}: inst_type has {n_type} rows but inst_map has {ids.size} '
                      'instances; types recomputed from type_map')
  return inst, types, warnings


def _majority_types(inst: np.ndarray, types: np.ndarray) -> tuple[np.ndarray, int]:
  """Makes `types` constant over each instance (instances.instance_table's vote).

  Returns:
    (type_map int32 [H, W] with background 0 outside instances, number of mixed instances).
  """
  table = instances.instance_table(inst, types)
  if not table['ids'].size:
    return np.zeros_like(types, np.int32), 0
  lut = np.zeros(int(table['ids'][-1]) + 1, np.int32)
  lut[table['ids']] = table['type']
  return lut[inst], int(np.count_nonzero((table['counts'] > 0).sum(axis=1) > 1))


def read_tile(name: str, image_path: pathlib.Path, label_path: pathlib.Path, dataset: str,
              scheme: str) -> Tile:
  """Reads and cross-checks one tile (image and labels must have the same H x W)."""
  image, w1 = read_image(image_path)
  inst, types, w2 = read_labels(label_path, dataset, scheme)
  if image.shape[:2] != inst.shape:
    raise DatasetError(f'{label_path}: label maps are {inst.shape[0]}x{inst.shape[1]} but image '
                       f'{image_path.name} is {image.shape[0]}x{image.shape[1]}; they must match')
  return Tile(name, image, inst, types, w1 + w2)


def iter_split(root: pathlib.Path, split: str, dataset: str, scheme: str) -> Iterator[Tile]:
  """Yields the validated tiles of a split in natural name order (logs every warning)."""
  if scheme not in ('original', 'merged'):
    raise DatasetError(f'labels scheme {scheme!r}: expected original or merged')
  for name, img, lab in split_pairs(root, split):
    tile = read_tile(name, img, lab, dataset, scheme)
    for w in tile.warnings:
      logging.warning('%s', w)
    yield tile
