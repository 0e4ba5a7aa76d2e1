"""Scoring of predicted against ground-truth `.mat` instance/type records: loading, metrics, JSON.

Files are matched by name; each holds `inst_map` [H, W], `inst_type` [N(, 1)] (types already merged) and
`inst_centroid` [N, 2] (x, y), optionally `inst_uid` [N(, 1)] (the ids that rows describe, as the official
tile output writes it; without it rows describe the distinct non-zero ids of `inst_map` in ascending order).
Instance metrics are means over images, detection/type metrics are pooled (docs/hovernet.md §5; the
conventions for empty images are in `seg_metrics`); given each image's tissue, PanNuke's per-tissue
mPQ and bPQ are added (`pannuke_pq`). The HoVer-Net stage calls `evaluate_arrays` and
`evaluate_dirs` for its validation and final evaluation; `python -m diffmix_jax.evaluate` is the
command line over two folders (diffmix_jax/evaluate.py); the `evaluate` stage is
diffmix_jax/stages/evaluate.py.
"""

import io
import json
import os
import pathlib
from typing import Any, Sequence

import numpy as np
from scipy import io as sio

from diffmix_jax.metrics import pannuke_pq
from diffmix_jax.metrics import seg_metrics
from diffmix_jax import workdir as wdir
from tfds_builders import instances
from tfds_builders import raw_folders

INSTANCE_KEYS = ('dice', 'aji', 'aji_plus', 'dq', 'sq', 'pq')
Record = dict[str, np.ndarray]


def _integer_array(x: np.ndarray, what: str, source: str) -> np.ndarray:
  """Casts to int64 after checking values are finite, integral and >= 0 (ValueError naming source)."""
  x = np.asarray(x)
  if x.dtype.kind not in 'biuf':
    raise ValueError(f'{source}: {what} must be numeric; got dtype {x.dtype}')
  if x.dtype.kind == 'f' and not (np.all(np.isfinite(x)) and np.all(x == np.round(x))):
    raise ValueError(f'{source}: {what} must hold finite integer values')
  if x.size and x.min() < 0:
    raise ValueError(f'{source}: {what} must be >= 0; found {x.min()}')
  return x.astype(np.int64)


def validate_record(record: dict[str, Any], source: str) -> Record:
  """Checks one image's arrays and brings them to canonical shapes and dtypes.

  Args:
    record: dict with `inst_map` [H, W], `inst_type` N values (any shape), `inst_centroid` [N, 2]
      (x, y) or empty, and optionally `inst_uid` N values.
    source: the file (or record name) to name in errors.

  Returns:
    Dict with `inst_map` [H, W] int32, `inst_type` [N] int32, `inst_centroid` [N, 2] float64 and, when
    given, `inst_uid` [N] int32.

  Raises:
    ValueError: naming `source`, for a missing key, a wrong shape, non-integer or negative ids/types,
      non-finite centroids, or N different from the instance count.
  """
  for key in ('inst_map', 'inst_type', 'inst_centroid'):
    if key not in record:
      found = sorted(k for k in record if not k.startswith('__'))
      raise ValueError(f'{source}: no {key!r} key (found {found}); expected inst_map [H, W], '
                       'inst_type [N, 1] and inst_centroid [N, 2]')
  inst_map = np.asarray(record['inst_map'])
  if inst_map.ndim != 2:
    raise ValueError(f'{source}: inst_map must be 2-D [H, W]; got shape {inst_map.shape}')
  inst_map = _integer_array(inst_map, 'inst_map', source)
  if inst_map.size and inst_map.max() > np.iinfo(np.int32).max:
    raise ValueError(f'{source}: inst_map ids exceed int32')
  inst_type = _integer_array(record['inst_type'], 'inst_type', source).ravel()
  centroid = np.asarray(record['inst_centroid'])
  if centroid.size == 0:
    centroid = np.zeros((0, 2))
  if centroid.ndim != 2 or centroid.shape[1] != 2 or centroid.dtype.kind not in 'biuf':
    raise ValueError(f'{source}: inst_centroid must be numeric [N, 2] (x, y); got shape '
                     f'{centroid.shape}, dtype {centroid.dtype}')
  centroid = centroid.astype(np.float64)
  if not np.all(np.isfinite(centroid)):
    raise ValueError(f'{source}: inst_centroid has NaN or infinite values')
  ids = seg_metrics.instance_ids(inst_map)
  out = {'inst_map': inst_map.astype(np.int32)}
  if 'inst_uid' in record:
    uid = _integer_array(record['inst_uid'], 'inst_uid', source).ravel()
    missing = np.setdiff1d(uid, ids)
    if len(np.unique(uid)) != len(uid) or len(missing):
      raise ValueError(f'{source}: inst_uid must list distinct ids of inst_map; not in the map: '
                       f'{missing[:5].tolist()}')
    count, what = len(uid), 'inst_uid entries'
    out['inst_uid'] = uid.astype(np.int32)
  else:
    count, what = len(ids), 'instances in inst_map'
  if len(inst_type) != count or len(centroid) != count:
    raise ValueError(f'{source}: inst_type has {len(inst_type)} rows and inst_centroid '
                     f'{len(centroid)}, but there are {count} {what}')
  out['inst_type'] = inst_type.astype(np.int32)
  out['inst_centroid'] = centroid
  return out


def label_record(inst_map: np.ndarray, type_map: np.ndarray) -> Record:
  """The record of a label map (ground truth, a synthetic patch's labels): per instance its type
  (`instances.instance_table`'s vote) and centre of mass.

  Args:
    inst_map: [H, W] int instance map (any ids, 0 = background).
    type_map: [H, W] int merged type map.

  Returns:
    `inst_map` [H, W] int32, `inst_type` [N] int32 and `inst_centroid` [N, 2] float64 (x, y) for the
    distinct non-zero ids in ascending order.
  """
  table = instances.instance_table(inst_map, type_map)
  return {'inst_map': np.asarray(inst_map, np.int32), 'inst_type': table['type'],
          'inst_centroid': table['centroid']}


def load_mat(path: str | os.PathLike) -> Record:
  """Reads and validates one `.mat` file (see `validate_record`; errors name the file).

  Args:
    path: the `.mat` file.

  Returns:
    The validated record: `inst_map` [H, W] int32, `inst_type` [N] int32, `inst_centroid` [N, 2]
    float64, optionally `inst_uid` [N] int32.
  """
  try:
    raw = sio.loadmat(str(path))
  except Exception as e:  # scipy raises several types for unreadable files.
    raise ValueError(f'{path}: cannot read as a .mat file ({e})') from e
  return validate_record(raw, str(path))


def save_mat(path: str | os.PathLike, record: Record) -> None:
  """Writes a record as an official-style `.mat` (N x 1 columns), atomically.

  Args:
    path: destination `.mat` file.
    record: dict with `inst_map`, `inst_type`, `inst_centroid` and optionally `inst_uid`.
  """
  rec = validate_record(record, str(path))
  out = {'inst_map': rec['inst_map'], 'inst_type': rec['inst_type'][:, None],
         'inst_centroid': rec['inst_centroid']}
  if 'inst_uid' in rec:
    out['inst_uid'] = rec['inst_uid'][:, None]
  buf = io.BytesIO()
  sio.savemat(buf, out, do_compression=True)
  wdir.atomic_write(path, buf.getvalue())  # Makes the folder; temp name, then rename.


def write_consep_example(folder: os.PathLike, name: str, image, record: dict) -> None:
  """`folder/Images/<name>.png` (RGB uint8 [H, W, 3]) and `folder/Labels/<name>.mat` (`record`:
  inst_map, type_map, inst_type, inst_centroid), each written atomically."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  folder = pathlib.Path(folder)
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format='png')
  wdir.atomic_write(folder / 'Images' / f'{name}.png', buf.getvalue())
  buf = io.BytesIO()
  sio.savemat(buf, record, do_compression=True)
  wdir.atomic_write(folder / 'Labels' / f'{name}.mat', buf.getvalue())


def evaluate_arrays(pairs: Sequence[tuple[dict[str, Any], dict[str, Any]]],
                    names: Sequence[str] | None = None,
                    radius: float = seg_metrics.MATCH_RADIUS,
                    weights: Sequence[float] = seg_metrics.F_C_WEIGHTS,
                    tissues: dict[str, str] | None = None) -> dict[str, Any]:
  """All metrics over a list of (truth, prediction) records (docs/hovernet.md §5).

  Args:
    pairs: one (true, pred) per image, each a dict as `validate_record` accepts.
    names: image names (default 'image_0', 'image_1', ...), used in `per_image` and in errors.
    radius: centroid pairing radius in pixels (inclusive), config `eval.match_radius`.
    weights: F_c weights, config `eval.f_c_weights`.
    tissues: {image name: tissue name} (PanNuke); when given, every name needs one and the result
      gets `pannuke`.

  Returns:
    JSON-ready dict: `dice`, `aji`, `aji_plus`, `dq`, `sq`, `pq` (means over images), `per_image`
    {name: {those six}}, `f_d`, `acc`, `f_c` {str(type id): float} for each pooled ground-truth type,
    `mpq_plus` (CoNIC's multi-class PQ: per class, pairs of IoU > 0.5 between instances of that
    class, counts pooled over the images; None without typed instances) and `pq_per_class`
    {str(class): PQ_c}, `num_images`, `num_true`, `num_pred`; with `tissues` also `pannuke`, PanNuke's
    tissue-averaged `mpq` and `bpq` and their `per_tissue` values (`pannuke_pq.tissue_pq`).
  """
  if not pairs:
    raise ValueError('evaluate_arrays needs at least one (true, pred) pair')
  names = list(names) if names is not None else [f'image_{i}' for i in range(len(pairs))]
  if len(names) != len(pairs) or len(set(names)) != len(names):
    raise ValueError(f'names must be {len(pairs)} distinct strings; got {names}')
  if tissues is not None:
    pannuke_pq.check_tissues(names, tissues)
  per_image, type_records, checked = {}, [], []
  for name, (true, pred) in zip(names, pairs):
    true = validate_record(true, f'{name} (true)')
    pred = validate_record(pred, f'{name} (pred)')
    if true['inst_map'].shape != pred['inst_map'].shape:
      raise ValueError(f'{name}: true inst_map shape {true["inst_map"].shape} differs from pred '
                       f'{pred["inst_map"].shape}')
    per_image[name] = seg_metrics.instance_metrics(true['inst_map'], pred['inst_map'])
    type_records.append((true['inst_centroid'], true['inst_type'], pred['inst_centroid'],
                         pred['inst_type']))
    checked.append((true, pred))
  types = seg_metrics.type_metrics(type_records, radius=radius, weights=weights)
  result = {k: float(np.mean([m[k] for m in per_image.values()])) for k in INSTANCE_KEYS}
  typed = [(t['inst_map'], _type_of_ids(t), p['inst_map'], _type_of_ids(p)) for t, p in checked]
  mpq, pq_c = _mpq_plus(typed)
  result.update(per_image=per_image, f_d=types['f_d'], acc=types['acc'],
                f_c={str(t): v for t, v in types['f_c'].items()}, mpq_plus=mpq,
                pq_per_class={str(c): v for c, v in pq_c.items()}, num_images=len(pairs),
                num_true=types['num_true'], num_pred=types['num_pred'])
  if tissues is not None:
    result['pannuke'] = pannuke_pq.tissue_pq(typed, names, tissues)
  return result


def _type_of_ids(record: Record) -> dict[int, int]:
  """{instance id: type} of a validated record (rows describe inst_uid, else the sorted ids)."""
  ids = record.get('inst_uid')
  if ids is None:
    ids = np.unique(record['inst_map'])
    ids = ids[ids > 0]
  return dict(zip(np.asarray(ids).tolist(), np.asarray(record['inst_type']).tolist()))


def _mpq_plus(typed: list[pannuke_pq.TypedImage]) -> tuple[float | None, dict[int, float]]:
  """CoNIC's mPQ+ over (true map, {id: type}, pred map, {id: type}) images: per-class counts pooled
  over the images."""
  classes = sorted({c for _, tt, _, pt in typed for c in (*tt.values(), *pt.values()) if c > 0})
  pooled = {c: np.zeros(4) for c in classes}
  for true_inst, tt, pred_inst, pt in typed:
    for c, v in seg_metrics.class_pq_counts(true_inst, tt, pred_inst, pt, classes).items():
      pooled[c] += v
  return seg_metrics.multi_class_pq(pooled)


def _mat_files(folder: pathlib.Path) -> dict[str, pathlib.Path]:
  """The folder's `.mat` files keyed by stem, in natural name order."""
  if not folder.is_dir():
    raise ValueError(f'{folder}: not a folder')
  return {p.stem: p for p in sorted(folder.glob('*.mat'), key=lambda p: raw_folders.natural_key(p.name))}


def evaluate_dirs(true_dir: str | os.PathLike, pred_dir: str | os.PathLike,
                  tissues: dict[str, str] | None = None, **kwargs: Any) -> dict[str, Any]:
  """Evaluates every `<name>.mat` of `pred_dir` against the same name in `true_dir`.

  Args:
    true_dir: folder of ground-truth `.mat` files.
    pred_dir: folder of predicted `.mat` files (exactly the same names).
    tissues: {file stem: tissue name} (PanNuke; see `evaluate_arrays`), or None.
    **kwargs: `radius` and `weights`, passed to `evaluate_arrays`.

  Returns:
    The dict of `evaluate_arrays`, images keyed by file stem in name order.

  Raises:
    ValueError: naming the file, for a file present on one side only, an unreadable or invalid file,
      or instance maps of different shapes; naming the image, for one without a tissue.
  """
  true_files, pred_files = _mat_files(pathlib.Path(true_dir)), _mat_files(pathlib.Path(pred_dir))
  if not true_files:
    raise ValueError(f'{true_dir}: no .mat files')
  for name, path in true_files.items():
    if name not in pred_files:
      raise ValueError(f'{path}: no prediction {pathlib.Path(pred_dir) / path.name}')
  for name, path in pred_files.items():
    if name not in true_files:
      raise ValueError(f'{path}: prediction without ground truth in {true_dir}')
  if tissues is not None:
    pannuke_pq.check_tissues(list(true_files), tissues)
  pairs = []
  for name in true_files:
    true, pred = load_mat(true_files[name]), load_mat(pred_files[name])
    if true['inst_map'].shape != pred['inst_map'].shape:
      raise ValueError(f'{pred_files[name]}: inst_map shape {pred["inst_map"].shape} differs from '
                       f'{true_files[name]} {true["inst_map"].shape}')
    pairs.append((true, pred))
  return evaluate_arrays(pairs, names=list(true_files), tissues=tissues, **kwargs)


def write_json(metrics: dict[str, Any], path: str | os.PathLike) -> None:
  """Writes `metrics` as JSON atomically (`wdir.atomic_write`)."""
  wdir.atomic_write(path, (json.dumps(metrics, indent=2) + '\n').encode())


def format_table(metrics: dict[str, Any]) -> str:
  """Readable table: per-image instance metrics, their mean, and the pooled detection/type scores."""
  head = ['image'] + [k.upper().replace('_PLUS', '+') for k in INSTANCE_KEYS]
  rows = [[name] + [f'{m[k]:.4f}' for k in INSTANCE_KEYS] for name, m in metrics['per_image'].items()]
  rows.append(['mean'] + [f'{metrics[k]:.4f}' for k in INSTANCE_KEYS])
  width = max(len(r[0]) for r in rows + [head])
  lines = ['  '.join([r[0].ljust(width)] + [c.rjust(7) for c in r[1:]]) for r in [head] + rows]
  lines.insert(1, '-' * len(lines[0]))
  lines.insert(len(lines) - 1, '-' * len(lines[0]))
  f_c = '  '.join(f'F_c[{t}] {v:.4f}' for t, v in metrics['f_c'].items())
  lines.append(f'F_d {metrics["f_d"]:.4f}  acc {metrics["acc"]:.4f}  {f_c}')
  lines.append(f'images {metrics["num_images"]}  true nuclei {metrics["num_true"]}  '
               f'predicted nuclei {metrics["num_pred"]}')
  if 'pannuke' in metrics:
    lines.extend(_pannuke_lines(metrics['pannuke']))
  return '\n'.join(lines)


def _pannuke_lines(pannuke: dict[str, Any]) -> list[str]:
  """PanNuke's tissue-averaged mPQ and bPQ, then one line per tissue ('n/a' for None)."""
  def fmt(v):
    return 'n/a' if v is None else f'{v:.4f}'
  per_tissue = pannuke['per_tissue']
  width = max(len(t) for t in per_tissue)
  lines = [f'PanNuke mPQ {fmt(pannuke["mpq"])}  bPQ {fmt(pannuke["bpq"])}  (means over tissues)']
  for t, v in per_tissue.items():
    lines.append(f'  {t.ljust(width)}  mPQ {fmt(v["mpq"])}  bPQ {fmt(v["bpq"])}  images {v["images"]}')
  return lines
