"""`python -m diffmix_jax.predict`: a trained HoVer-Net applied to a folder of new tiles.

  python -m diffmix_jax.predict --workdir runs/demo --run baseline --images tiles/ --out pred/
  python -m diffmix_jax.predict --model_dir converted/ --images tiles/ --out pred/
  python -m diffmix_jax.predict --checkpoint hovernet_fast_pannuke_type_tf2pytorch.tar \
      --type_info type_info.json --images tiles/ --out pred/
  python -m diffmix_jax.predict --workdir runs/demo --slides slides/ a.svs --out wsi/   # [wsi] extra

With `--slides` (files or folders) whole slides are read at the model's µm/px and predicted chunk by
chunk into `<out>/<slide stem>/` (nuclei.geojson, nuclei.json, nuclei.parquet, summary.json,
tissue_mask.png, thumbnail.png): see `diffmix_jax.slides` and docs/slides.md.

The model comes from a run of `main` (`--workdir`, `--run`: `baseline`, `diffmix_s1`, ...), from
what `convert_torch --model hovernet` wrote (`--model_dir`), or from an official PyTorch checkpoint
converted on the fly (`--checkpoint`, the `[torch]` extra). Per tile the official tile-mode outputs
(docs/hovernet.md §4.2): `mat/<name>.mat` (inst_map, inst_uid, inst_type, inst_centroid; `evaluate`
reads this folder as predictions), `json/<name>.json` (per nucleus bbox, centroid, contour, type,
type_prob), `overlay/<name>.png` (contours coloured by class) and `qupath/<name>.geojson` (one
detection per nucleus, QuPath's GeoJSON import). Each file is written atomically; a tile whose
outputs exist and were written by the same model (`fingerprint/<name>.txt`: weights, model config
and post-processing) is skipped on a rerun; another model redoes it. An unreadable or unsupported
image is reported by name, the others are still processed, and the exit status is 1.
"""

import dataclasses
import hashlib
import json
import os
import pathlib
import sys
from typing import Any, Sequence

from absl import app
from absl import flags
from absl import logging
import cv2
import numpy as np

from diffmix_jax import workdir as wdir
from diffmix_jax.slides import writers as slide_writers

IMAGE_SUFFIXES = ('.png', '.tif', '.tiff', '.jpg', '.jpeg')
OUTPUTS = (('mat', '.mat'), ('json', '.json'), ('overlay', '.png'), ('qupath', '.geojson'))


@dataclasses.dataclass
class Model:
  module: Any  # hovernet.model.HoVerNet
  variables: Any  # {'params', 'batch_stats'}
  model_config: dict  # The `config.hovernet.model` fields that rebuild the module.
  class_names: list[str] | None  # Names by type id (0 = background), when the source has them.
  # `metrics.postprocess.Params`: a workdir's `config.eval.postprocess`, else the official values.
  postprocess: Any = None
  mpp: float | None = None  # µm/px of the training tiles (a workdir's config.data.mpp), when known.

  def fingerprint(self) -> str:
    """SHA-256 over the model config, the post-processing and every weight (in tree order)."""
    import jax  # pylint: disable=g-import-not-at-top
    from diffmix_jax.metrics import postprocess  # pylint: disable=g-import-not-at-top
    params = (self.postprocess or postprocess.OFFICIAL)._asdict()
    h = hashlib.sha256(json.dumps([self.model_config, params], sort_keys=True).encode())
    for path, leaf in jax.tree_util.tree_flatten_with_path(self.variables)[0]:
      h.update(jax.tree_util.keystr(path).encode())
      h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return h.hexdigest()


def _model_config(fields: dict):
  """`config.hovernet.model` with `fields` over the base config's defaults (the official net)."""
  from configs import common  # pylint: disable=g-import-not-at-top
  cfg = common.base_config().hovernet.model
  unknown = sorted(set(fields) - set(cfg))
  if unknown:
    raise ValueError(f'model config: unknown field(s) {unknown}; expected fields of '
                     f'config.hovernet.model ({", ".join(sorted(cfg))})')
  cfg.update({k: tuple(int(u) for u in v.split(',')) if k.endswith('_units') and isinstance(v, str)
              else v for k, v in fields.items()})  # Units: a comma string in older model files.
  return cfg


def _names(value) -> list[str]:
  """`data.class_names` of a workdir's config.json: a list (a comma string in older workdirs)."""
  return [n.strip() for n in value.split(',')] if isinstance(value, str) else list(value)


def from_files(fields: dict, variables_path, names) -> Model:
  """The model of `config.hovernet.model` fields and a `variables.msgpack` written for them."""
  from diffmix_jax.hovernet import infer as hovernet_infer  # pylint: disable=g-import-not-at-top
  from diffmix_jax.hovernet import model as hovernet  # pylint: disable=g-import-not-at-top
  module = hovernet.create_hovernet(**_model_config(fields))
  return Model(module, hovernet_infer.load_variables(str(variables_path), module), dict(fields),
               names)


def load_model(workdir: str = '', run: str = '', model_dir: str = '', checkpoint: str = '') -> Model:
  """The model of exactly one source: a `main` run, a converted folder or an official checkpoint.

  Raises:
    ValueError: when not exactly one source is given.
    FileNotFoundError: naming the missing file.
  """
  from diffmix_jax import convert_torch  # pylint: disable=g-import-not-at-top
  if sum(bool(s) for s in (workdir, model_dir, checkpoint)) != 1:
    raise ValueError('give exactly one model source: --workdir (with --run), --model_dir or '
                     '--checkpoint')
  if workdir:
    path = pathlib.Path(workdir) / wdir.CONFIG
    if not path.exists():
      raise FileNotFoundError(f'{path}: missing; --workdir must be a workdir of '
                              '`python -m diffmix_jax.main` (it writes config.json)')
    from diffmix_jax.metrics import postprocess  # pylint: disable=g-import-not-at-top
    config = json.loads(path.read_text())
    model = from_files(config['hovernet']['model'],
                       wdir.hovernet_variables_path(workdir, run or 'baseline'),
                       _names(config['data']['class_names']))
    if 'postprocess' in config['eval']:  # Workdirs from before the field: the official values.
      model.postprocess = postprocess.params_from(config['eval']['postprocess'])
    model.mpp = config['data'].get('mpp')  # Workdirs from before the field: --model_mpp.
    return model
  if model_dir:
    cfg_path = pathlib.Path(model_dir) / convert_torch.HOVERNET_CONFIG
    if not cfg_path.exists():
      raise FileNotFoundError(f'{cfg_path}: missing; --model_dir must be a folder written by '
                              '`python -m diffmix_jax.convert_torch --model hovernet`')
    return from_files(json.loads(cfg_path.read_text()),
                      pathlib.Path(model_dir) / convert_torch.HOVERNET_VARIABLES, None)
  if not os.path.isfile(checkpoint):
    raise FileNotFoundError(f'{checkpoint}: no such checkpoint file (--checkpoint)')
  module, variables = convert_torch.load_hovernet(checkpoint)
  return Model(module, variables, convert_torch.hovernet_model_fields(module), None)


def class_table(nr_types: int, names: Sequence[str] | None = None, type_info: str = '',
                class_names: str = '') -> list[tuple[str, tuple[int, int, int]]]:
  """(name, RGB colour) per type id 0..nr_types-1: from `type_info` (HoVer-Net's type_info.json,
  `{"id": ["name", [r, g, b]]}`), else `class_names` (a comma list of nr_types names, background
  first), else `names` (the run's config), else `type_1...`; colours from `labels.CLASS_COLOURS`.

  Raises:
    ValueError: naming the file or flag, for a table that does not cover every type id.
  """
  from diffmix_jax.data import labels  # pylint: disable=g-import-not-at-top
  colour = lambda t: tuple(int(v) for v in labels.CLASS_COLOURS[t % len(labels.CLASS_COLOURS)])
  if type_info:
    try:
      info = json.loads(pathlib.Path(type_info).read_text())
      table = {int(k): (str(v[0]), tuple(int(c) for c in v[1])) for k, v in info.items()}
    except (OSError, ValueError, TypeError, IndexError) as e:
      raise ValueError(f'{type_info}: expected HoVer-Net type_info.json '
                       f'{{"id": ["name", [r, g, b]]}}: {e}') from None
    missing = [t for t in range(1, nr_types) if t not in table]
    if missing:
      raise ValueError(f'{type_info}: no entry for type id(s) {missing} of the {nr_types}-type model')
    return [table.get(t, ('background', (0, 0, 0))) for t in range(nr_types)]
  if class_names:
    names = [n.strip() for n in class_names.split(',')]
    if len(names) != nr_types or not all(names):
      raise ValueError(f'--class_names={class_names!r}: expected {nr_types} comma-separated names '
                       '(background first) for this model')
  if not names or len(names) != nr_types:
    names = ['background'] + [f'type_{t}' for t in range(1, nr_types)]
  return [(names[t], colour(t)) for t in range(nr_types)]


def list_images(folder: str) -> list[pathlib.Path]:
  """Image files of `folder` (IMAGE_SUFFIXES, any case) in name order.

  Raises:
    FileNotFoundError: when the folder is missing or holds no image.
    ValueError: naming both files, when two images share a stem (their outputs would collide).
  """
  root = pathlib.Path(folder)
  if not root.is_dir():
    raise FileNotFoundError(f'{folder}: no such folder (--images)')
  paths = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
  if not paths:
    raise FileNotFoundError(f'{folder}: no image ({", ".join(IMAGE_SUFFIXES)}, any case)')
  seen = {}
  for p in paths:
    if p.stem in seen:
      raise ValueError(f'{seen[p.stem]} and {p} share the name {p.stem!r}: their outputs would '
                       'overwrite each other; rename one')
    seen[p.stem] = p
  return paths


def read_image(path: pathlib.Path) -> np.ndarray:
  """RGB uint8 [H, W, 3] (RGBA drops its alpha).

  Raises:
    ValueError: naming the file, when it cannot be read, is grayscale, or is not 8-bit.
  """
  image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
  if image is None:
    raise ValueError(f'{path}: not a readable image')
  if image.dtype != np.uint8:
    raise ValueError(f'{path}: {image.dtype} pixels ({image.dtype.itemsize * 8}-bit); expected '
                     '8-bit RGB')
  if image.ndim == 2 or image.shape[2] < 3:
    raise ValueError(f'{path}: grayscale ({image.shape}); expected an RGB H&E tile')
  return cv2.cvtColor(image[..., :3], cv2.COLOR_BGR2RGB)


def nuclei_json(info: dict[int, dict]) -> dict:
  """Official tile-mode JSON: `{"mag": null, "nuc": {"<id>": {bbox, centroid, contour, type_prob,
  type}}}` (bbox [[rmin, cmin], [rmax, cmax]], centroid [x, y], contour [[x, y], ...])."""
  return {'mag': None, 'nuc': {str(i): slide_writers.nucleus_entry(
      np.asarray(n['bbox']).tolist(), np.asarray(n['centroid']).tolist(),
      np.asarray(n['contour']).tolist(), n['type'], n['type_prob'])
      for i, n in sorted(info.items())}}


def geojson(info: dict[int, dict], table) -> dict:
  """QuPath GeoJSON: one detection Feature per nucleus, its contour as a closed pixel Polygon."""
  return {'type': 'FeatureCollection', 'features': [
      slide_writers.qupath_feature(str(i), np.asarray(n['contour']).tolist(), *table[int(n['type'])],
                                   {'type_prob': float(n['type_prob'])})
      for i, n in sorted(info.items())]}


def overlay(image: np.ndarray, info: dict[int, dict], table) -> np.ndarray:
  """The tile with each nucleus contour drawn in its class colour: uint8 [H, W, 3]."""
  out = np.ascontiguousarray(image.copy())
  for n in info.values():
    cv2.drawContours(out, [np.asarray(n['contour'], np.int32)], -1, table[int(n['type'])][1], 1)
  return out


def _write_tile(out: pathlib.Path, name: str, image: np.ndarray, inst_map, info, table,
                fingerprint: str) -> None:
  """The four outputs of one tile, then its fingerprint (written last: it marks the tile done)."""
  from diffmix_jax.metrics import records  # pylint: disable=g-import-not-at-top
  from diffmix_jax.metrics import postprocess  # pylint: disable=g-import-not-at-top
  records.save_mat(out / 'mat' / f'{name}.mat', postprocess.to_record(inst_map, info))
  wdir.atomic_write(out / 'json' / f'{name}.json',
                           json.dumps(nuclei_json(info)).encode())
  slide_writers.write_png(out / 'overlay' / f'{name}.png', overlay(image, info, table))
  wdir.atomic_write(out / 'qupath' / f'{name}.geojson',
                           json.dumps(geojson(info, table)).encode())
  wdir.atomic_write(out / 'fingerprint' / f'{name}.txt', fingerprint.encode())


def is_done(out: pathlib.Path, name: str, fingerprint: str) -> bool:
  """True when the tile's four outputs exist and its fingerprint file names this model."""
  mark = out / 'fingerprint' / f'{name}.txt'
  return (mark.exists() and mark.read_text() == fingerprint
          and all((out / d / f'{name}{ext}').exists() for d, ext in OUTPUTS))


def predict_folder(model: Model, images: str, out: str, table, batch_size: int = 8) -> list[str]:
  """Predicts every image of `images` into `out`; returns the errors (one line per bad file)."""
  from diffmix_jax.hovernet import infer as hovernet_infer  # pylint: disable=g-import-not-at-top
  from diffmix_jax.metrics import postprocess  # pylint: disable=g-import-not-at-top
  from diffmix_jax.core import writers  # pylint: disable=g-import-not-at-top
  paths, root = list_images(images), pathlib.Path(out)
  fingerprint = model.fingerprint()
  todo = [p for p in paths if not is_done(root, p.stem, fingerprint)]
  logging.info('predict: %d images, %d done by this model already, %d to do', len(paths),
               len(paths) - len(todo), len(todo))
  if not todo:
    return []
  predict = hovernet_infer.create_predictor(model.module, model.variables, batch_size)
  progress, errors = writers.create_progress(len(todo), every_secs=10.0), []
  for k, path in enumerate(todo):
    try:
      image = read_image(path)
    except ValueError as e:
      errors.append(str(e))
      logging.error('predict: %s', e)
      continue
    pred_map = hovernet_infer.predict_tile(predict, model.module, image)
    inst_map, info = postprocess.process(pred_map, model.module.nr_types,
                                         model.postprocess or postprocess.OFFICIAL)
    _write_tile(root, path.stem, image, inst_map, info, table, fingerprint)
    progress(k + 1)
  return errors


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1 and not flags.FLAGS.slides:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  slides = list(f.slides or []) + (list(argv[1:]) if f.slides else [])
  if f.distributed:  # Before any other JAX call.
    from configs import common  # pylint: disable=g-import-not-at-top
    from diffmix_jax.core import sharding  # pylint: disable=g-import-not-at-top
    mesh = common.base_config().mesh
    mesh.update(coordinator_address=f.coordinator_address, num_processes=f.num_processes,
                process_id=f.process_id)
    sharding.initialize_distributed(mesh)
  try:
    model = load_model(f.workdir, f.run, f.model_dir, f.checkpoint)
    if not model.module.nr_types:
      raise ValueError('the model has no TP branch (nr_types): predict needs nucleus types')
    table = class_table(model.module.nr_types, model.class_names, f.type_info, f.class_names)
    if bool(f.images) == bool(slides):
      raise ValueError('give exactly one of --images (tiles) and --slides (whole slides)')
    if f.images:
      errors, wrote = predict_folder(model, f.images, f.out, table, f.batch_size), 'mat/, json/, ...'
    else:
      errors, wrote = _predict_slides(model, slides, table), '<slide>/nuclei.geojson, ...'
  except (ValueError, FileNotFoundError) as e:
    print(f'predict: error: {e}', file=sys.stderr)
    sys.exit(2)
  for e in errors:
    print(f'predict: skipped: {e}', file=sys.stderr)
  print(f'predict: wrote {f.out} ({wrote})'
        + (f'; {len(errors)} file(s) could not be read' if errors else ''))
  sys.exit(1 if errors else 0)


def _predict_slides(model: Model, slides: list[str], table) -> list[str]:
  """`--slides`: the model's µm/px (--model_mpp, else its config, else 0.25) and the slide flags."""
  from diffmix_jax.slides import pipeline  # pylint: disable=g-import-not-at-top
  from diffmix_jax.slides import runner  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  model_mpp = f.model_mpp or model.mpp or 0.25
  if not (f.model_mpp or model.mpp):
    logging.warning('predict: the model states no µm/px; assuming 0.25 (40x, as every official '
                    'HoVer-Net checkpoint); set --model_mpp otherwise')
  if not 0 <= f.mpp_tolerance < 1 or f.mpp < 0 or f.chunk < 1 or f.workers < 0:
    raise ValueError(f'--mpp_tolerance={f.mpp_tolerance} (expected [0, 1)), --mpp={f.mpp} (>= 0), '
                     f'--chunk={f.chunk} (>= 1), --workers={f.workers} (>= 0): out of range')
  opts = pipeline.Options(chunk=f.chunk, margin_px=f.margin, mpp=f.mpp, tolerance=f.mpp_tolerance,
                          masks=f.masks, workers=f.workers, normalise=f.normalise)
  return runner.predict_slides(model, slides, f.out, table, model_mpp, opts, f.batch_size)


if __name__ == '__main__':
  flags.DEFINE_string('workdir', '', 'Workdir of `python -m diffmix_jax.main` holding the run.')
  flags.DEFINE_string('run', 'baseline', 'Run name in --workdir (baseline, diffmix, diffmix_s1, ...).')
  flags.DEFINE_string('model_dir', '', 'Folder written by `convert_torch --model hovernet`.')
  flags.DEFINE_string('checkpoint', '', 'Official HoVer-Net PyTorch checkpoint (.tar; [torch]).')
  flags.DEFINE_string('images', None, 'Folder of tiles (.png .tif .tiff .jpg .jpeg, any case).')
  flags.DEFINE_multi_string('slides', None, 'Whole slides or folders of them (more may follow as '
                            'arguments); the [wsi] extra reads SVS, NDPI, pyramidal TIFF, ...')
  flags.DEFINE_string('out', None, 'Output folder (tiles: mat/, json/, ...; slides: <stem>/).')
  flags.DEFINE_float('mpp', 0.0, 'µm/px of level 0 for slides whose file states none.')
  flags.DEFINE_float('mpp_tolerance', 0.1, 'Relative µm/px difference read without resampling.')
  flags.DEFINE_float('model_mpp', 0.0, 'µm/px the model was trained at (0: its config, else 0.25).')
  flags.DEFINE_string('masks', '', 'Folder of tissue masks <slide stem>.png (nonzero = tissue).')
  flags.DEFINE_integer('chunk', 12, 'Output blocks per chunk side (fast: 164 px, original: 80 px).')
  flags.DEFINE_integer('margin', 160, 'Least margin (px) post-processed around a chunk.')
  flags.DEFINE_integer('workers', 2, 'Post-processing processes beside the network (0: inline).')
  flags.DEFINE_enum('normalise', 'slide', ['slide', 'chunk'], 'HV ranges over the whole slide (as '
                   'tile mode; two network passes) or per chunk (HoVer-Net WSI mode; one pass).')
  flags.DEFINE_bool('distributed', False, 'jax.distributed.initialize (the launch scripts\' env); '
                    'the processes share the slides through claim files.')
  flags.DEFINE_string('coordinator_address', '', 'host:port of process 0 (with --distributed).')
  flags.DEFINE_integer('num_processes', -1, 'Processes (with --distributed; -1 = auto-detect).')
  flags.DEFINE_integer('process_id', -1, 'This process (with --distributed; -1 = auto-detect).')
  flags.DEFINE_string('type_info', '', 'HoVer-Net type_info.json: {"id": ["name", [r, g, b]]}.')
  flags.DEFINE_string('class_names', '', 'Comma list of names by type id, background first.')
  flags.DEFINE_integer('batch_size', 8, 'Patches per jitted call (a multiple of local devices).')
  flags.mark_flags_as_required(['out'])
  app.run(main)
