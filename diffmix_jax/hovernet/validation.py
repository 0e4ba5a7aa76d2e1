"""Validation during HoVer-Net training: every process predicts its share of the tiles, process 0
scores them all (docs/hovernet.md §5, §7).

The inference step is jitted once per (network, mesh, batch) and reused every epoch
(`hovernet_infer.create_predictor`). With several processes each one writes its tiles' records to
`<run dir>/validation/` and process 0 reads them all after a barrier, as the evaluate stage does,
so no process sits in a collective while another predicts alone.
"""

import os
import pathlib
from typing import Any

import jax
import numpy as np
from scipy import io as sio

from diffmix_jax.metrics import postprocess
from diffmix_jax.metrics import records as mat_records
from diffmix_jax.hovernet import infer as hovernet_infer
from diffmix_jax.data import input_pipeline
from diffmix_jax.data import labels
from diffmix_jax.core import sharding


def overlay(tile: dict, pred: dict) -> np.ndarray:
  """image | truth | prediction of one tile, instance edges in their type colour: uint8 [H, 3W, 3]."""
  pred_types = np.zeros_like(pred['inst_map'])
  for uid, typ in zip(pred['inst_uid'], pred['inst_type']):
    pred_types[pred['inst_map'] == uid] = typ
  draw = lambda inst, typ: np.where(labels.edge_map(inst)[..., None],
                                    labels.colour_labels(typ), tile['image'])
  return np.concatenate([tile['image'], draw(tile['inst_map'], tile['type_map']),
                         draw(pred['inst_map'], pred_types)], axis=1).astype(np.uint8)


def _gather(records: dict[int, dict], n: int, folder: pathlib.Path, step: int) -> list[dict] | None:
  """All n records in tile order on process 0 (None elsewhere): the other processes leave theirs
  in `folder` for it."""
  if jax.process_count() == 1:
    return [records[i] for i in range(n)]
  if jax.process_index() != 0:
    for i, rec in records.items():
      mat_records.save_mat(folder / f'{i:05d}.mat', rec)
  sharding.barrier(f'validation {folder} {step}')
  if jax.process_index() != 0:
    return None
  out = []
  for i in range(n):
    if i in records:
      out.append(records[i])
      continue
    mat = sio.loadmat(folder / f'{i:05d}.mat')
    out.append({'inst_map': mat['inst_map'].astype(np.int32),
                'inst_type': mat['inst_type'].ravel().astype(np.int32),
                'inst_centroid': mat['inst_centroid'].reshape(-1, 2)})
  return out


def validate(module, variables, tiles: list[dict], batch_size: int, eval_config,
             folder: str | os.PathLike, step: int = 0) -> tuple[dict, Any] | None:
  """Tiled inference + post-processing of this process's share of `tiles`, then (process 0)
  `mat_records.evaluate_arrays` over all of them.

  Args:
    module, variables: the HoVerNet and its host variables {'params', 'batch_stats'}.
    tiles: `name`, `image` uint8 [H, W, 3], `inst_map`, `type_map` int32 [H, W]; the same list in
      every process.
    batch_size: patches per jitted call (a multiple of the local devices).
    eval_config: `config.eval` (match radius, F_c weights, post-processing).
    folder: where processes leave their records for process 0 (multi-process only).
    step: the training step (names the barrier).

  Returns:
    On process 0: (scalars val_dice, val_aji, val_pq, val_f_d, val_acc; the `overlay` of the first
    tile); None on the other processes.
  """
  predict = hovernet_infer.create_predictor(module, variables, batch_size)
  mine = input_pipeline.eval_indices(len(tiles), jax.process_index(), jax.process_count())
  records, picture = {}, None
  params = postprocess.params_from(eval_config.postprocess)
  for i in mine:
    records[i] = hovernet_infer.predict_record(predict, module, tiles[i]['image'], params)
    if i == 0:  # Process 0 always holds tile 0.
      picture = overlay(tiles[0], records[0])
  preds = _gather(records, len(tiles), pathlib.Path(folder), step)
  if preds is None:
    return None
  pairs = [(mat_records.label_record(t['inst_map'], t['type_map']), p)
           for t, p in zip(tiles, preds)]
  m = mat_records.evaluate_arrays(pairs, names=[t['name'] for t in tiles],
                               radius=eval_config.match_radius,
                               weights=tuple(eval_config.f_c_weights))
  return {f'val_{k}': float(m[k]) for k in ('dice', 'aji', 'pq', 'f_d', 'acc')}, picture
