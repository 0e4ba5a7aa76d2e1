"""Reading and validating a user's raw dataset folder (CoNSeP / GLySAC / nuclei_folder layout,
docs/datasets.md §1, §5).

Layout: `<root>/{Train,Test}/Images/<name>.{png,tif,tiff,jpg,jpeg}` and
`<root>/{Train,Test}/Labels/<name>.mat` (`inst_map` with `type_map` or `inst_type`) or `<name>.npy`
([H, W, 2]: instance ids, class ids). Every problem raises `DatasetError` naming the file and the
expected form; recoverable oddities (RGBA images, `inst_type` of the wrong length, mixed-type
instances, non-contiguous ids) are fixed and reported as warnings, never silently.
"""

import dataclasses
import logging
import pathlib
import re
from typing import Iterator

import numpy as np
from PIL import Image
import scipy.io

from tfds_builders import class_tables
from tfds_builders import instances

# Raw class ids -> merged ids (docs/hovernet.md §6.1-6.2, docs/sdm.md §4.6). Background 0 stays 0.
# CoNSeP: 1 other; 2 inflammatory; 3, 4 -> 3 epithelial; 5, 6, 7 -> 4 spindle-shaped.
# GLySAC: {1, 2, 9, 10} -> 1; {4, 5, 6, 7} -> 2; {3, 8} -> 3.
_MERGES = {
    'consep': {0: 0, 1: 1, 2: 2, 3: 3, 4: 3, 5: 4, 6: 4, 7: 4},
    'glysac': {0: 0, 1: 1, 2: 1, 9: 1, 10: 1, 4: 2, 5: 2, 6: 2, 7: 2, 3: 3, 8: 3},
}


def _check_dataset(dataset: str) -> str:
  if dataset not in _MERGES:
    raise ValueError(f'unknown dataset {dataset!r} for class merging; expected one of '
                     f'{sorted(_MERGES)}')
  return dataset


def _lut(merges: dict[int, int]) -> np.ndarray:
  """int32 [max source id + 1]: source id -> class id, -1 for ids the merge does not list."""
  table = np.full(max(merges) + 1, -1, np.int32)
  for raw, merged in merges.items():
    table[raw] = merged
  return table


def merge_table(dataset: str) -> np.ndarray:
  """Lookup table raw id -> merged id.

  Args:
    dataset: 'consep' or 'glysac'.

  Returns:
    int32 [max_raw_id + 1]; `table[type_map]` merges a raw map.
  """
  return _lut(_MERGES[_check_dataset(dataset)])


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


@dataclasses.dataclass(frozen=True)
class Scheme:
  """The class ids a folder's label files hold: ids 0..`max_id`, mapped through `lut` (int32
  [max_id + 1], source id -> class id) or, when `lut` is None, class ids already. `what` names the
  scheme in errors; `hint` follows an out-of-scheme error."""
  lut: np.ndarray | None
  max_id: int
  what: str
  hint: str = ''


def dataset_scheme(dataset: str, labels: str) -> Scheme:
  """CoNSeP's or GLySAC's scheme: 'original' (raw ids, merged here) or 'merged'."""
  if labels not in ('original', 'merged'):
    raise DatasetError(f'labels scheme {labels!r}: expected original or merged')
  table = merge_table(dataset)
  if labels == 'original':
    return Scheme(table, len(table) - 1, f'original {dataset} scheme')
  return Scheme(None, int(table.max()), f'merged {dataset} scheme',
                ' (use --labels original for raw class ids)')


def table_scheme(table: class_tables.ClassTable, source: str) -> Scheme:
  """A nuclei_folder's scheme from its class table (`source` names classes.json in errors)."""
  if table.merge is None:
    return Scheme(None, table.num_classes - 1, f'class ids of {source}')
  return Scheme(_lut(table.merge), max(table.merge), f'"merge" source ids of {source}')


IMAGE_SUFFIXES = ('.png', '.tif', '.tiff', '.jpg', '.jpeg')
LABEL_SUFFIXES = ('.mat', '.npy')
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
    DatasetError: missing folder, or an image without its label file (or the reverse).
  """
  folder = pathlib.Path(root) / SPLIT_FOLDERS[split]
  img_dir, lab_dir = folder / 'Images', folder / 'Labels'
  for d in (img_dir, lab_dir):
    if not d.is_dir():
      raise DatasetError(f'missing folder {d}: expected <root>/{{Train,Test}}/{{Images,Labels}}/ '
                         f'(images .png/.tif/.jpg, labels .mat or .npy)')
  images, labels = _by_stem(img_dir, IMAGE_SUFFIXES), _by_stem(lab_dir, LABEL_SUFFIXES)
  no_label = sorted(set(images) - set(labels))
  no_image = sorted(set(labels) - set(images))
  if no_label:
    raise DatasetError(f'image(s) without a label file in {lab_dir}: '
                       + ', '.join(f'{images[n].name} (expected {n}.mat)' for n in no_label))
  if no_image:
    raise DatasetError(f'label file(s) without an image in {img_dir}: '
                       + ', '.join(f'{labels[n].name} (expected {n}.png or {n}.tif)'
                                   for n in no_image))
  if not images:
    raise DatasetError(f'no images (.png/.tif/.jpg) in {img_dir}')
  return [(n, images[n], labels[n]) for n in sorted(images, key=natural_key)]


def _by_stem(folder: pathlib.Path, suffixes: tuple[str, ...]) -> dict[str, pathlib.Path]:
  """{stem: path} of the files in `folder` with one of `suffixes` (any case); a stem twice is an
  error."""
  found = {}
  for p in folder.iterdir():
    if p.suffix.lower() in suffixes:
      if p.stem in found:
        raise DatasetError(f'two files named {p.stem} in {folder}: {found[p.stem].name}, {p.name}')
      found[p.stem] = p
  return found


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


def integer_ids(a, key: str, path: pathlib.Path) -> np.ndarray:
  """`a` as int32 ids >= 0 (MATLAB floats must hold integers); `key` names it in errors."""
  a = np.asarray(a)
  if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)
          or a.dtype == bool):
    raise DatasetError(f'{path}: {key} has dtype {a.dtype}; expected integer ids')
  if np.issubdtype(a.dtype, np.floating):
    if not np.all(np.isfinite(a)) or np.any(a != np.round(a)):
      raise DatasetError(f'{path}: {key} holds non-integer values; expected integer ids')
  if a.size and a.min() < 0:
    raise DatasetError(f'{path}: {key} holds negative ids (min {a.min()}); expected ids >= 0')
  if a.size and a.max() > np.iinfo(np.int32).max:
    raise DatasetError(f'{path}: {key} holds ids above 2^31 - 1 (max {a.max()})')
  return a.astype(np.int32)


def _load_maps(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """The raw (inst_map, type_map) of a `.mat` (`inst_map` + `type_map` or `inst_type`) or `.npy`
  ([H, W, 2]) label file, as int32 [H, W] each, and warnings."""
  if path.suffix.lower() == '.npy':
    try:
      a = np.load(path, allow_pickle=False)
    except Exception as e:  # ValueError, OSError, EOFError for corrupt files.
      raise DatasetError(f'cannot read label file {path}: {e}') from e
    if a.ndim != 3 or a.shape[-1] != 2:
      raise DatasetError(f'{path}: shape {a.shape}; expected [H, W, 2] (instance ids, class ids)')
    return integer_ids(a[..., 0], 'channel 0 (instance ids)', path), integer_ids(
        a[..., 1], 'channel 1 (class ids)', path), []
  try:
    mat = scipy.io.loadmat(str(path))
  except Exception as e:
    raise DatasetError(f'cannot read label file {path}: {e}') from e
  found = sorted(k for k in mat if not k.startswith('__'))
  expected = ("expected 'inst_map' (H x W instance ids) with 'type_map' (H x W class ids) or "
              "'inst_type' (N x 1, the class of ids 1..N)")
  if 'inst_map' not in mat:
    raise DatasetError(f"{path}: no 'inst_map' in the .mat file (found {found}); {expected}")
  inst = integer_ids(mat['inst_map'], 'inst_map', path)
  if inst.ndim != 2:
    raise DatasetError(f'{path}: inst_map has shape {inst.shape}; expected a 2-D H x W map')
  warnings = []
  if 'type_map' in mat:
    types = integer_ids(mat['type_map'], 'type_map', path)
    if types.shape != inst.shape:
      raise DatasetError(f'{path}: inst_map {inst.shape} and type_map {types.shape} differ in '
                         'shape')
    n = int(np.count_nonzero(np.unique(inst)))
    if 'inst_type' in mat and np.asarray(mat['inst_type']).size != n:
      warnings.append(f'{path.name}: inst_type has {np.asarray(mat["inst_type"]).size} rows but '
                      f'inst_map has {n} instances; types recomputed from type_map')
    return inst, types, warnings
  if 'inst_type' not in mat:
    raise DatasetError(f"{path}: no 'type_map' in the .mat file (found {found}); {expected}")
  per_id = integer_ids(np.ravel(mat['inst_type']), 'inst_type', path)
  if per_id.size != int(inst.max(initial=0)):
    raise DatasetError(f'{path}: inst_type has {per_id.size} rows but inst_map ids reach '
                       f'{int(inst.max(initial=0))}; without type_map each id 1..N needs its row')
  return inst, np.concatenate([[0], per_id]).astype(np.int32)[inst], warnings


def read_labels(path: pathlib.Path, scheme: Scheme) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """Reads and validates a label file; maps source ids to class ids through `scheme.lut`.

  Args:
    path: the `.mat` or `.npy` file.
    scheme: the ids the file may hold and their mapping (`dataset_scheme`, `table_scheme`).

  Returns:
    (inst_map int32 [H, W] ids 1..N contiguous, type_map int32 [H, W] class ids, constant per
    instance; warnings).
  """
  inst, types, warnings = _load_maps(path)
  inst, types, more = clean_maps(inst, types, scheme, path.name, str(path))
  return inst, types, warnings + more


def clean_maps(inst: np.ndarray, types: np.ndarray, scheme: Scheme, name: str, source: str,
               note_renumbering: bool = True) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """Checks a pair of raw maps against `scheme` and puts them in the builders' form.

  Args:
    inst: int32 [H, W] instance ids >= 0 (any ids).
    types: int32 [H, W] source class ids >= 0.
    scheme: the ids `types` may hold and their mapping.
    name: the tile's name, at the head of warnings.
    source: the file (and field) named in errors.
    note_renumbering: warn when ids are not 1..N (off for sets cut into patches, where it is the
      rule).

  Returns:
    (inst_map int32 [H, W] ids 1..N contiguous, type_map int32 [H, W] class ids, constant per
    instance; warnings).
  """
  bad = np.unique(types[types > scheme.max_id])
  if scheme.lut is not None and not bad.size:
    bad = np.intersect1d(np.unique(types), np.flatnonzero(scheme.lut < 0))
  if bad.size:
    raise DatasetError(f'{source}: class ids {bad.tolist()} are outside the {scheme.what} '
                       f'0..{scheme.max_id}{scheme.hint}')
  if scheme.lut is not None:
    types = scheme.lut[types]
  warnings = []
  ids = np.unique(inst[inst > 0])
  if ids.size and (ids[0] != 1 or ids[-1] != ids.size):
    values, dense = np.unique(inst, return_inverse=True)  # Memory by pixels, not by the top id.
    inst = (dense.reshape(inst.shape) + (0 if values[0] == 0 else 1)).astype(np.int32)
    if note_renumbering:
      warnings.append(f'{name}: instance ids were not 1..N; renumbered {ids.size} instances')
  types, mixed = _majority_types(inst, types)
  if mixed:
    warnings.append(f'{name}: {mixed} instance(s) with mixed types; took the majority type '
                    '(background only where it is the only value)')
  untyped = int(np.count_nonzero((types == 0) & (inst > 0)))
  if untyped:
    warnings.append(f'{name}: {untyped} nucleus pixels have type 0 (background)')
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


def read_tile(name: str, image_path: pathlib.Path, label_path: pathlib.Path,
              scheme: Scheme) -> Tile:
  """Reads and cross-checks one tile (image and labels must have the same H x W)."""
  image, w1 = read_image(image_path)
  inst, types, w2 = read_labels(label_path, scheme)
  if image.shape[:2] != inst.shape:
    raise DatasetError(f'{label_path}: label maps are {inst.shape[0]}x{inst.shape[1]} but image '
                       f'{image_path.name} is {image.shape[0]}x{image.shape[1]}; they must match')
  return Tile(name, image, inst, types, w1 + w2)


def iter_split(root: pathlib.Path, split: str, scheme: Scheme) -> Iterator[Tile]:
  """Yields the validated tiles of a split in natural name order (logs every warning)."""
  for name, img, lab in split_pairs(root, split):
    tile = read_tile(name, img, lab, scheme)
    for w in tile.warnings:
      logging.warning('%s', w)
    yield tile
