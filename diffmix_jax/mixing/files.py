"""The mixed-label-map files the `mix_labels` stage writes and the `sample` stage reads (NumPy only).

  <workdir>/mixed_labels/balance/<tile>.npz  inst_map, type_map int32 [H, W]; ids, inst_type int32 [M];
      inst_centroid float64 [M, 2] (x, y); prov_<column> int64 [R] (balancing.balance_tile),
      prov_donor_name str [R]; touched int32 [K]
  <workdir>/mixed_labels/enlarge/<tile>.npz  offsets int32 [P, 2]; inst_maps int32 [P, S, S]; classes,
      real_ids int32 [P, K]; move_<column> int32 [Q]; num_nuclei, num_interior, num_moved int32 [P]
"""

import io
import os

import numpy as np

from diffmix_jax import workdir as wdir
from diffmix_jax.mixing import balancing
from diffmix_jax.mixing import enlarging
from tfds_builders import raw_folders

KINDS = ('balance', 'enlarge')


def _check_kind(kind: str) -> None:
  if kind not in KINDS:
    raise ValueError(f'kind must be one of {KINDS}; got {kind!r}')


def write_balanced(workdir: os.PathLike, b: balancing.BalanceResult, donor_names: np.ndarray) -> None:
  """Writes one balanced tile's map (donor_names: str [R], the donor tile of each replacement)."""
  _save_npz(wdir.mixed_dir(workdir, 'balance') / f'{b.name}.npz', inst_map=b.inst_map,
            type_map=b.type_map, ids=b.ids, inst_type=b.inst_type, inst_centroid=b.inst_centroid,
            touched=b.touched, prov_donor_name=donor_names,
            **{f'prov_{k}': v for k, v in b.provenance.items()})


def write_enlarged(workdir: os.PathLike, e: enlarging.EnlargeResult) -> None:
  """Writes one tile's enlarged grid-patch maps."""
  _save_npz(wdir.mixed_dir(workdir, 'enlarge') / f'{e.name}.npz', offsets=e.offsets,
            inst_maps=e.inst_maps, classes=e.classes, real_ids=e.real_ids, num_nuclei=e.num_nuclei,
            num_interior=e.num_interior, num_moved=e.num_moved,
            **{f'move_{k}': v for k, v in e.moves.items()})


def remove_stale(workdir: os.PathLike, kind: str, kept: list[str]) -> None:
  """Deletes maps of `kind` whose tile is not in `kept` (left by an unfinished older run)."""
  for stale in set(mixed_names(workdir, kind)) - set(kept):
    (wdir.mixed_dir(workdir, kind) / f'{stale}.npz').unlink()


def _save_npz(path: os.PathLike, **arrays) -> None:
  buf = io.BytesIO()
  np.savez_compressed(buf, **arrays)
  wdir.atomic_write(path, buf.getvalue())


def mixed_names(workdir: os.PathLike, kind: str) -> list[str]:
  """Tile names with a stored map of `kind` ('balance' or 'enlarge'), in natural tile-name order."""
  _check_kind(kind)
  folder = wdir.mixed_dir(workdir, kind)
  names = [p.stem for p in folder.glob('*.npz')] if folder.is_dir() else []
  return sorted(names, key=raw_folders.natural_key)


def load_mixed(workdir: os.PathLike, kind: str, name: str) -> dict:
  """Reads one tile's mixed labels.

  Args:
    workdir: the experiment workdir.
    kind: 'balance' (one map per tile) or 'enlarge' (one map per grid patch, §4.1).
    name: tile name, e.g. 'train_3'.

  Returns:
    balance: {'inst_map', 'type_map': int32 [H, W], 'ids', 'inst_type': int32 [M], 'inst_centroid':
      float64 [M, 2] (x, y), 'provenance': {column: [R]}, 'touched': int32 [K]}.
    enlarge: {'offsets': int32 [P, 2] (row, col), 'inst_maps', 'type_maps': int32 [P, S, S] (ids
      re-mapped per patch), 'classes', 'real_ids': int32 [P, K] (per patch id), 'moves': {column:
      int32 [Q]}, 'num_nuclei', 'num_interior', 'num_moved': int32 [P]}.
  """
  _check_kind(kind)
  path = wdir.mixed_dir(workdir, kind) / f'{name}.npz'
  if not path.exists():
    raise FileNotFoundError(f'{path} does not exist: run the mix_labels stage first (names there: '
                            f'{mixed_names(workdir, kind)[:5]}...)')
  with np.load(path) as z:
    d = {k: z[k] for k in z.files}
  if kind == 'balance':
    prov = {k[5:]: d.pop(k) for k in list(d) if k.startswith('prov_')}
    return dict(d, provenance=prov)
  moves = {k[5:]: d.pop(k) for k in list(d) if k.startswith('move_')}
  d['type_maps'] = enlarging.patch_type_maps(d['classes'], d['inst_maps'])
  return dict(d, moves=moves)
