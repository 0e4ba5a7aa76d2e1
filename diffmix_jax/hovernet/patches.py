"""HoVer-Net training data: the synthetic-set reader, patch packing, mirror-mode windows, batches.

Host-side (NumPy, grain): what the `hovernet_train` stage feeds its jitted steps (docs/hovernet.md §2,
§6.3). Every batch is a pure function of (phase seed, step), so a resumed run sees the same batches.
"""

import dataclasses
import json
import os
import pathlib
from typing import Any, Sequence

import cv2
import grain
import jax
import numpy as np
from scipy import io as sio

from diffmix_jax.hovernet import augment as hovernet_augment
from diffmix_jax.hovernet import targets as hovernet_targets


MANIFEST = 'manifest.json'  # Written by `data.synthetic.export_consep` beside Images/ and Labels/.


def _kind_filter(folder: pathlib.Path, names: list[str], kinds: tuple[str, ...]) -> list[str]:
  """The names whose manifest kind is in `kinds`; every name must be in the manifest."""
  path = folder / MANIFEST
  if not path.exists():
    raise FileNotFoundError(
        f'{path}: missing. Training on the {"/".join(kinds)} patches alone needs the manifest the '
        'sample stage writes ({"patches": {<name>: {"kind": "balance"|"enlarge", ...}}}); rerun '
        'the sample stage into a fresh workdir, or use the `diffmix` arm (all patches)')
  entries = json.loads(path.read_text()).get('patches', {})
  missing = [n for n in names if n not in entries]
  if missing:
    raise ValueError(f'{path}: no entry for {len(missing)} patch(es), e.g. {missing[:3]}')
  return [n for n in names if entries[n].get('kind') in kinds]


def read_synthetic(folder: str | os.PathLike, kinds: tuple[str, ...] | None = None) -> list[dict]:
  """The synthetic patch set, CoNSeP layout: `Images/<name>.png` + `Labels/<name>.mat`.

  This is the reader contract with the `sample` stage, whose `data.synthetic.export_consep` writes
  `<workdir>/synthetic/consep_format/`: each `.mat` holds `inst_map` and `type_map` [H, W] (merged
  classes), each PNG the RGB image of the same size; `manifest.json` records each patch's kind.

  Args:
    folder: the set's folder.
    kinds: keep only patches of these mixing kinds ('balance', 'enlarge'; `arms.ARMS`), read from
      the manifest; None keeps every patch (no manifest needed).

  Returns:
    A list of {`name`, `image` uint8 [H, W, 3], `inst_map` int32, `type_map` int32} in name order.

  Raises:
    FileNotFoundError: when the folder, its Images/Labels parts or (with `kinds`) the manifest are
      missing, or when no patch of `kinds` is there.
    ValueError: naming the file, for a missing key or mismatched sizes.
  """
  folder = pathlib.Path(folder)
  images = sorted((folder / 'Images').glob('*.png')) if (folder / 'Images').is_dir() else []
  if not images:
    raise FileNotFoundError(
        f'{folder}/Images/*.png: no synthetic patches. The HoVer-Net arms with synthetic data need '
        'the set written by the `sample` stage (Images/<name>.png + Labels/<name>.mat with '
        'inst_map and type_map); run that stage first, or train only the `baseline` arm '
        '(--config.hovernet.train.runs=baseline)')
  if kinds is not None and set(kinds) != {'balance', 'enlarge'}:
    keep = set(_kind_filter(folder, [p.stem for p in images], kinds))
    images = [p for p in images if p.stem in keep]
    if not images:
      raise FileNotFoundError(f'{folder / MANIFEST}: no patch of kind {"/".join(kinds)}')
  out = []
  for path in images:
    mat_path = folder / 'Labels' / f'{path.stem}.mat'
    if not mat_path.exists():
      raise FileNotFoundError(f'{mat_path}: missing label file for {path}')
    mat = sio.loadmat(str(mat_path))
    for key in ('inst_map', 'type_map'):
      if key not in mat:
        raise ValueError(f'{mat_path}: no {key!r} key; expected inst_map and type_map [H, W]')
    image = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    inst, types = mat['inst_map'].astype(np.int32), mat['type_map'].astype(np.int32)
    if inst.shape != image.shape[:2] or types.shape != image.shape[:2]:
      raise ValueError(f'{mat_path}: label maps {inst.shape}/{types.shape} differ from the image '
                       f'{image.shape[:2]} of {path}')
    out.append({'name': path.stem, 'image': image, 'inst_map': inst, 'type_map': types})
  return out


def pack_patches(patches: list[dict], window: int) -> list[dict]:
  """Packs synthetic patches smaller than half the window into a grid per window (row-major).

  A p x p patch padded alone to the network input would be mostly black; packing
  floor(window / p)^2 of them per window gives each training step as much synthetic content as a
  real window. Instance ids are offset so they stay distinct. The last window's free cells take
  the first patches again (the demo's diffmix set left 1 patch in a 99 % black window, a tenth of
  its synthetic rows: black rows skew BatchNorm's running statistics away from real tiles).

  Args:
    patches: `read_synthetic` items (`image` uint8 [p, p, 3], `inst_map`, `type_map` int32 [p, p]).
    window: the training window side (the real windows' size).

  Returns:
    The patches unchanged when p > window / 2; else packed items with `name` 'packed_<k>' and
    arrays of side floor(window / p) * p.

  Raises:
    ValueError: when patches smaller than half the window differ in size (naming two of them).
  """
  if not patches or 2 * max(patches[0]['image'].shape[:2]) > window:
    return patches
  side = patches[0]['image'].shape[:2]
  for q in patches:
    if q['image'].shape[:2] != side:
      raise ValueError(f'synthetic patches {patches[0]["name"]} {side} and {q["name"]} '
                       f'{q["image"].shape[:2]} differ in size; expected one patch size')
  rows, cols = window // side[0], window // side[1]
  per = rows * cols
  cells = patches + [patches[i % len(patches)] for i in range((-len(patches)) % per)]
  out = []
  for k in range(0, len(patches), per):
    image = np.zeros((rows * side[0], cols * side[1], 3), np.uint8)
    inst, types = (np.zeros(image.shape[:2], np.int32) for _ in range(2))
    offset = 0
    for n, q in enumerate(cells[k:k + per]):
      r, c = divmod(n, cols)
      win = (slice(r * side[0], (r + 1) * side[0]), slice(c * side[1], (c + 1) * side[1]))
      image[win], types[win] = q['image'], q['type_map']
      inst[win] = np.where(q['inst_map'] > 0, q['inst_map'] + offset, 0)
      offset += int(q['inst_map'].max())
    out.append({'name': f'packed_{k // per}', 'image': image, 'inst_map': inst,
                'type_map': types})
  return out


def synthetic_items(patches: list[dict], window: int, step: int) -> list[dict]:
  """The synthetic rows a run draws from.

  Patches of at least half the window join as they are (the DiffMix recipe adds its 256-px patches
  to the training list whole, docs/method.md). Smaller ones are packed (`pack_patches`) and the
  mosaics cut into mirror-mode windows as real tiles are (§6.3): a mosaic fed whole would have only
  its centre under the network's output (fast mode: 164 of 256 px, so 9 of 25 demo patches in
  full). Mosaics too small for a window at this step (step = window) stay whole.

  Returns:
    Items {`name`, `image` uint8 [S, S, 3], `inst_map`, `type_map` int32 [S, S]}.
  """
  packed = pack_patches(patches, window)
  side = min(packed[0]['image'].shape[:2]) if packed else 0
  if packed is patches or side + 2 * ((window - step) // 2) < window:
    return packed
  windows = PatchSet(packed, window, step)
  out = []
  for k, (i, r, c) in enumerate(windows.offsets):
    image, inst, types = windows[k]
    out.append({'name': f'{packed[i]["name"]}_{r}_{c}', 'image': image, 'inst_map': inst,
                'type_map': types})
  return out


class PatchSet:
  """The real training items: mirror-mode windows of the tiles (§6.3), in tile then grid order."""

  def __init__(self, tiles: list[dict], window: int, step: int):
    self.images, self.labels, self.offsets = [], [], []
    for i, t in enumerate(tiles):
      h, w = np.shape(t['image'])[:2]
      if min(h, w) + 2 * ((window - step) // 2) < window:
        raise ValueError(f'tile {t.get("name", i)}: {h}x{w} px, mirror-padded by (window - step) '
                         f'/ 2 = {(window - step) // 2} px a side, is smaller than '
                         f'config.hovernet.train.patch_window={window}; lower '
                         f'config.hovernet.train.patch_step (step {window - min(h, w)} gives one '
                         'window per tile) or use larger tiles')
      self.images.append(hovernet_targets.mirror_pad(np.asarray(t['image'], np.uint8), window, step))
      self.labels.append(hovernet_targets.mirror_pad(
          np.stack([t['inst_map'], t['type_map']], axis=-1).astype(np.int32), window, step))
      self.offsets += [(i, r, c) for r, c in
                       hovernet_targets.patch_offsets(self.images[-1].shape[:2], window, step)]
    self.window = window

  def __len__(self) -> int:
    return len(self.offsets)

  def __getitem__(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Window k: (image uint8 [S, S, 3], inst_map, type_map int32 [S, S])."""
    i, r, c = self.offsets[k]
    win = (slice(r, r + self.window), slice(c, c + self.window))
    lab = self.labels[i][win]
    return self.images[i][win], lab[..., 0], lab[..., 1]


def synthetic_per_batch(ratio: float, real_batch: int, num_items: int, steps_per_epoch: int) -> int:
  """Synthetic items beside `real_batch` real ones in every batch: round(ratio * real_batch), or
  for ratio < 0 enough that each of `num_items` (packed) items is seen once per epoch of
  `steps_per_epoch` steps."""
  if ratio < 0:
    return -(-num_items // steps_per_epoch)
  return int(round(ratio * real_batch))


def make_example(item, rng: np.random.Generator, input_size: int, output_size: int,
                 augment: bool) -> dict:
  """One training example (docs/hovernet.md §2.1): shape aug, intensity aug, targets.

  Returns:
    `image` uint8 [I, I, 3], `np`, `tp` int32 [O, O], `hv` float32 [O, O, 2].
  """
  image, inst, types = item
  image, inst, types = hovernet_augment.shape_augment(rng, image, inst, types, input_size, augment)
  if augment:
    image = hovernet_augment.intensity_augment(rng, image)
  return {'image': image, **hovernet_targets.targets(inst, types, output_size)}


def batch_indices(n: int, step: int, global_batch: int, seed: Sequence[int]
                  ) -> tuple[int, np.ndarray]:
  """(epoch, item indices) of global batch `step` of an epoch-wise reshuffled stream with drop_last
  (seeded per epoch)."""
  per_epoch = n // global_batch
  epoch, k = divmod(step, per_epoch)
  order = np.random.default_rng([*seed, epoch]).permutation(n)
  return epoch, order[k * global_batch:(k + 1) * global_batch]


def cycle_indices(n: int, step: int, per_batch: int, seed: Sequence[int]) -> np.ndarray:
  """Indices of the `per_batch` items batch `step` takes from a set of n drawn in cycles: each
  cycle is a fresh permutation, so every item is used once before any is reused."""
  cycle, pos = np.divmod(step * per_batch + np.arange(per_batch), n)
  return np.array([np.random.default_rng([*seed, c]).permutation(n)[p]
                   for c, p in zip(cycle, pos)], np.int64)


@dataclasses.dataclass(frozen=True)
class Seeds:
  """The random streams of one run and phase: real batch order, synthetic draw, augmentation."""
  real: tuple[int, ...]
  synthetic: tuple[int, ...]
  augment: tuple[int, ...]

  @classmethod
  def of(cls, master: int, seed: int, phase: int) -> 'Seeds':
    """From (config.seed, HoVer-Net seed, phase) only: every arm of a seed gets the same."""
    return cls(*((master, seed, phase, k) for k in range(3)))


def create_dataset(real: PatchSet, synthetic: list[dict], *, seeds: Seeds, real_batch: int,
                   synthetic_batch: int, start: int, total: int, input_size: int,
                   output_size: int, augment: bool, num_threads: int) -> Any:
  """Iterator over this process's rows of global batches start..total-1 (a pure function of step).

  Global batch `step` is `real_batch` real windows (`batch_indices`, epochs of the real set) then
  `synthetic_batch` items of `synthetic` (`cycle_indices`); row i is augmented with the generator
  [*seeds.augment, step, i]. The real rows depend only on `seeds` and `real_batch`, so runs that
  differ in their synthetic data train on the same real examples in the same order.
  """
  if synthetic_batch and not synthetic:
    raise ValueError('synthetic_batch > 0 with an empty synthetic set')
  local = (real_batch + synthetic_batch) // jax.process_count()
  lo = jax.process_index() * local

  def load(step: int) -> dict:
    _, rows = batch_indices(len(real), step, real_batch, seeds.real)
    items = [real[int(j)] for j in rows]  # Views of the padded tiles: cheap to take them all.
    if synthetic_batch:
      picked = cycle_indices(len(synthetic), step, synthetic_batch, seeds.synthetic)
      items += [(synthetic[j]['image'], synthetic[j]['inst_map'], synthetic[j]['type_map'])
                for j in picked]
    exs = [make_example(items[i], np.random.default_rng([*seeds.augment, step, i]), input_size,
                        output_size, augment) for i in range(lo, lo + local)]
    return {key: np.stack([e[key] for e in exs]) for key in exs[0]}

  ds = grain.MapDataset.range(start, total).map(load)
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=max(num_threads, 1),
                                                   prefetch_buffer_size=max(2 * num_threads, 2))))
