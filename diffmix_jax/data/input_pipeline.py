"""Input pipeline: TFDS data source -> grain. Training crops with dihedral augmentation, eval tiles.

Host NumPy out. Training elements are a pure function of (seed, global element index), so batches are
identical for any number of processes or workers, and the grain iterator state restores exactly.
"""

import pathlib

import grain
import ml_collections
import numpy as np

from diffmix_jax import config_checks
from diffmix_jax.data import datasets
from diffmix_jax import workdir as wdir

NUM_AUGS = 6  # 0 none; 1, 2, 3 rotate by 90 deg * k; 4 flip left-right; 5 flip up-down (docs/sdm.md §4.6).


def _builder(dataset: str, data_dir: str, labels: str, **options):
  """The built dataset's builder; FileNotFoundError when it is not built in `data_dir`."""
  from tfds_builders import registry  # pylint: disable=g-import-not-at-top
  builder = registry.create_builder(dataset, data_dir, labels, **options)
  if not pathlib.Path(builder.data_dir, 'dataset_info.json').exists():
    raise FileNotFoundError(
        f'{dataset} ({builder.builder_config.name}) is not built in {data_dir}: run the build_data '
        f'stage or python -m diffmix_jax.build_data --dataset {dataset} --data_dir {data_dir} ...')
  return builder


def open_source(dataset: str, data_dir: str, labels: str, split: str, **options):
  """Random-access source of built tiles: `src[i]` is a dict of decoded NumPy arrays.

  Args:
    dataset: a builder name (tfds_builders/registry.py).
    data_dir: TFDS data_dir the dataset was built into (`build_data`).
    labels: label scheme the dataset was built with ('original' or 'merged').
    split: 'train' or 'test'.
    **options: the builder options it was built with (datasets.builder_options).

  Returns:
    A `tfds.data_source`-style sequence; items have `image` uint8 [H, W, 3], `inst_map` and
    `type_map` int32 [H, W], `name` bytes (PanNuke also `tissue` bytes).
  """
  return _builder(dataset, data_dir, labels, **options).as_data_source(split=split)


def dataset_metadata(dataset: str, data_dir: str, labels: str, **options) -> dict:
  """The built dataset's metadata (the class table and split record of builders that keep them)."""
  return dict(_builder(dataset, data_dir, labels, **options).info.metadata or {})


class _Subset:
  """The items of a data source at `indices`, in that order."""

  def __init__(self, source, indices: list[int]):
    self._source, self._indices = source, indices

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, i: int):
    return self._source[self._indices[i]]


def source_for(config: ml_collections.ConfigDict, workdir: str, split: str):
  """`open_source` for the configured dataset (data_dir defaults to `<workdir>/tfds`), restricted
  to `config.data.<split>_tiles` when that is set (the builder's order kept)."""
  data_dir = wdir.tfds_dir(config, workdir)
  source = open_source(config.data.name, data_dir, config.data.labels, split,
                       **datasets.builder_options(config))
  wanted = set(config.data[f'{split}_tiles'])
  if not wanted:
    return source
  names = [_tile_name(source[i]) for i in range(len(source))]
  config_checks.check_tile_names(config, split, names)
  return _Subset(source, [i for i, n in enumerate(names) if n in wanted])


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def _tile_name(ex: dict) -> str:
  return _text(ex['name'])


def _tile(ex: dict) -> dict:
  tile = {'name': _tile_name(ex),
          'image': np.asarray(ex['image'], np.uint8),
          'inst_map': np.asarray(ex['inst_map'], np.int32),
          'type_map': np.asarray(ex['type_map'], np.int32)}
  if 'tissue' in ex:  # PanNuke: scored per tissue by `evaluate`.
    tile['tissue'] = _text(ex['tissue'])
  return tile


def load_split(config: ml_collections.ConfigDict, workdir: str, split: str) -> list[dict]:
  """All tiles of a split in memory, in the builder's (natural name) order.

  Returns:
    A list of dicts: `name` str, `image` uint8 [H, W, 3], `inst_map` int32 [H, W] (ids 1..N),
    `type_map` int32 [H, W] (merged classes).
  """
  src = source_for(config, workdir, split)
  return [_tile(src[i]) for i in range(len(src))]


def dihedral(a: np.ndarray, aug: int) -> np.ndarray:
  """Applies augmentation `aug` in 0..5 to the H, W axes (the first two) of `a`."""
  if aug == 0:
    return a
  if aug in (1, 2, 3):
    return np.rot90(a, k=aug, axes=(0, 1))
  if aug == 4:
    return a[:, ::-1]
  if aug == 5:
    return a[::-1]
  raise ValueError(f'augmentation id {aug} is not in 0..5')


def crop_offsets(rng: np.random.Generator, shape: tuple[int, int], size: int) -> tuple[int, int]:
  """Uniform top-left offsets; every legal offset 0..H-size, 0..W-size is reachable (fixes the
  official off-by-two of docs/sdm.md §4.6, docs/differences.md §1.19)."""
  h, w = shape
  if h < size or w < size:
    raise ValueError(f'tile of {h}x{w} is smaller than the crop size {size} (config.data.crop_size)')
  return int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))


def training_crop(tile: dict, aug: int, rng: np.random.Generator, size: int) -> dict:
  """One training element: a random crop, then the dihedral augmentation on all three maps.

  Returns:
    `image` float32 [S, S, 3] in [-1, 1] (x / 127.5 - 1), `inst_map`, `type_map` int32 [S, S].
  """
  y0, x0 = crop_offsets(rng, tile['image'].shape[:2], size)
  win = (slice(y0, y0 + size), slice(x0, x0 + size))
  image = dihedral(tile['image'][win], aug).astype(np.float32) / 127.5 - 1.0
  return {'image': np.clip(image, -1.0, 1.0),
          'inst_map': np.ascontiguousarray(dihedral(tile['inst_map'][win], aug)),
          'type_map': np.ascontiguousarray(dihedral(tile['type_map'][win], aug))}


class _CachedTiles:
  """Decodes each tile once per process (the datasets are tens of tiles)."""

  def __init__(self, source):
    self._source = source
    self._cache = {}

  def __len__(self):
    return len(self._source)

  def __getitem__(self, i: int) -> dict:
    if i not in self._cache:
      self._cache[i] = _tile(self._source[i])
    return self._cache[i]


def train_dataset(source, *, crop_size: int, global_batch: int, seed: int,
                  process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  """Infinite, seeded batches of training crops for one process.

  The global element stream is a per-epoch reshuffle of (tile, augmentation) pairs, n_tiles x 6 per
  epoch (augmentation = index mod 6, as the official loader). Global batch k holds stream elements
  k*B ... k*B + B - 1; process p gets rows p*B/P ... (p+1)*B/P - 1 of it, so the assembled global batch
  is the same for every process count. Crop offsets come from an RNG keyed by (seed, element index).

  Args:
    source: random-access tiles (`open_source` / `source_for`).
    crop_size: crop side.
    global_batch: batch size over all processes; divisible by `process_count`.
    seed: data seed.
    process_index: this process (jax.process_index()).
    process_count: number of processes (jax.process_count()).

  Returns:
    A grain MapDataset whose item k is this process's part of global batch k: `image` float32
    [b, S, S, 3], `inst_map`, `type_map` int32 [b, S, S], b = global_batch / process_count.
  """
  if global_batch % process_count:
    raise ValueError(f'global batch {global_batch} is not divisible by the process count '
                     f'{process_count}')
  tiles = _CachedTiles(source)
  if len(tiles) == 0:
    raise ValueError('the training split has no tiles')
  order = grain.MapDataset.range(len(tiles) * NUM_AUGS).shuffle(seed=seed).repeat(None)
  local = global_batch // process_count

  def element(j: int) -> dict:
    k, r = divmod(j, local)
    g = k * global_batch + process_index * local + r  # Index in the global element stream.
    tile_index, aug = divmod(int(order[g]), NUM_AUGS)
    rng = np.random.default_rng([seed, g])
    return training_crop(tiles[tile_index], aug, rng, crop_size)

  ds = grain.MapDataset.range(2**40).map(element)
  return ds.batch(local, drop_remainder=True)


def eval_indices(n: int, process_index: int = 0, process_count: int = 1) -> list[int]:
  """This process's share of n evaluation items: disjoint across processes, covering all once."""
  if not 0 <= process_index < process_count:
    raise ValueError(f'process index {process_index} is not in 0..{process_count - 1}')
  return list(range(process_index, n, process_count))
