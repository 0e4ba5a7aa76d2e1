"""Stage `evaluate`: tiled inference of the test tiles with every HoVer-Net run, then the metrics of
`metrics.records` per run (docs/hovernet.md §5, §7)."""

import json
import os

from diffmix_jax.metrics import postprocess
from diffmix_jax.metrics import records
from diffmix_jax import workdir as wdir

def _evaluate_run(config, workdir: str, run: str, tiles: list[dict], module, out,
                  label: str = '') -> None:
  """Predicts this process's share of `tiles` with run `run`'s model, then (process 0) scores them
  to `eval/<label>.json` (label defaults to the run's name; its .mat files go to eval/<label>/, and
  the tiles' tissues, when they carry one, to eval/<label>/tissue.json for PanNuke's per-tissue
  PQ)."""
  import jax  # pylint: disable=g-import-not-at-top  (the CLI above needs no JAX)
  from diffmix_jax.core import sharding  # pylint: disable=g-import-not-at-top
  from diffmix_jax.hovernet import infer as hovernet_infer  # pylint: disable=g-import-not-at-top
  from diffmix_jax.core import writers  # pylint: disable=g-import-not-at-top
  label = label or run
  pred_dir, true_dir = wdir.eval_record_dirs(workdir, label)
  pred_dir.mkdir(parents=True, exist_ok=True)
  true_dir.mkdir(parents=True, exist_ok=True)
  tissue_json = wdir.eval_tissue_json(workdir, label)
  if jax.process_index() == 0:
    save_tissues(tiles, tissue_json)
  variables = hovernet_infer.load_variables(wdir.hovernet_variables_path(workdir, run), module)
  predict = hovernet_infer.create_predictor(module, variables, config.eval.batch_size)
  params = postprocess.params_from(config.eval.postprocess)
  mine = [tiles[i] for i in eval_indices_for(len(tiles))]
  progress = writers.create_progress(len(mine))
  for k, tile in enumerate(mine):
    if not (pred_dir / f'{tile["name"]}.mat').exists():  # Resume: finished tiles are kept.
      records.save_mat(true_dir / f'{tile["name"]}.mat',
                       records.label_record(tile['inst_map'], tile['type_map']))
      records.save_mat(pred_dir / f'{tile["name"]}.mat',
                       hovernet_infer.predict_record(predict, module, tile['image'], params))
    progress(k + 1)
  if jax.process_count() > 1:
    sharding.barrier(f'evaluate {label} predicted')
  if jax.process_index() == 0:
    tissues = json.loads(tissue_json.read_text()) if tissue_json.exists() else None
    metrics = records.evaluate_dirs(true_dir, pred_dir, radius=config.eval.match_radius,
                                    weights=tuple(config.eval.f_c_weights), tissues=tissues)
    records.write_json(metrics, wdir.eval_json(workdir, label))
    print(f'evaluate {label}:\n{records.format_table(metrics)}')


def save_tissues(tiles: list[dict], path: os.PathLike) -> None:
  """Writes {tile name: tissue} of the tiles that carry a `tissue` (str) as JSON to `path`,
  atomically; writes nothing when no tile carries one."""
  tissues = {t['name']: t['tissue'] for t in tiles if 'tissue' in t}
  if tissues:
    wdir.atomic_write(path, (json.dumps(tissues, indent=1, sort_keys=True) + '\n').encode())


def eval_indices_for(n: int) -> list[int]:
  """This process's share of n test tiles (input_pipeline.eval_indices)."""
  import jax  # pylint: disable=g-import-not-at-top
  from diffmix_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  return input_pipeline.eval_indices(n, jax.process_index(), jax.process_count())


def _synthetic_folder(config, workdir: str) -> str:
  """The synthetic set to score with the baseline model, or '' when there is none to score
  (`eval.synthetic_fidelity` off, no baseline arm, or no synthetic set written)."""
  from diffmix_jax.core import arms  # pylint: disable=g-import-not-at-top
  if not config.eval.synthetic_fidelity or arms.fidelity_run(config) is None:
    return ''
  folder = wdir.synthetic_consep_dir(config, workdir)
  return folder if os.path.isdir(os.path.join(folder, 'Images')) else ''


def _forget_other_postprocessing(config, workdir: str, labels: list[str], out) -> None:
  """Records post-processed with other `eval.postprocess` values than the config's are deleted
  (with their metrics and DONE), so that every run is scored again; the values in use are kept in
  `eval/postprocess.json` (a workdir from before it counts as the official values)."""
  import shutil  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  want = postprocess.params_from(config.eval.postprocess)._asdict()
  path = out.path / 'postprocess.json'
  have = json.loads(path.read_text()) if path.exists() else postprocess.OFFICIAL._asdict()
  if have != want:
    logging.warning('evaluate: post-processing %s here, %s in the config: scoring every run again',
                    have, want)
    for label in labels:
      shutil.rmtree(wdir.eval_record_dirs(workdir, label)[0], ignore_errors=True)
      wdir.eval_json(workdir, label).unlink(missing_ok=True)
    (out.path / wdir.DONE).unlink(missing_ok=True)
  if have != want or not path.exists():
    out.write_text('postprocess.json', json.dumps(want))


def run(config, workdir: str) -> None:
  """Stage `evaluate`: every arm x seed of `hovernet.train` on the test split (docs/hovernet.md §5, §7).

  Writes `<workdir>/eval/<run>/{pred,true}/<tile>.mat`, `<workdir>/eval/<run>.json` (metrics of
  `evaluate_dirs`, with PanNuke's per-tissue `pannuke` when the test tiles carry a tissue, kept in
  `eval/<run>/tissue.json`; run names of `arms.run_name`), the same for the first seed's baseline
  model on the synthetic set as `synthetic_fidelity` (when there is one and
  `config.eval.synthetic_fidelity`), and `<workdir>/eval/DONE`. A rerun is a no-op when every wanted
  JSON exists; runs added to the config since are scored alone, and a killed stage keeps the tiles
  and runs it finished.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  from diffmix_jax.core import arms  # pylint: disable=g-import-not-at-top
  from diffmix_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from diffmix_jax.hovernet import model as hovernet  # pylint: disable=g-import-not-at-top
  out = wdir.StageDir(workdir, wdir.EVAL)
  names = [arms.run_name(a, s) for a, s in arms.runs(config)]
  synthetic = _synthetic_folder(config, workdir)
  wanted = names + ([wdir.SYNTHETIC_FIDELITY] if synthetic else [])
  if jax.process_index() == 0:
    _forget_other_postprocessing(config, workdir, names + [wdir.SYNTHETIC_FIDELITY], out)
  if jax.process_count() > 1:
    from diffmix_jax.core import sharding  # pylint: disable=g-import-not-at-top
    sharding.barrier('evaluate postprocess checked')
  if out.done() and all(wdir.eval_json(workdir, n).exists() for n in wanted):
    logging.info('evaluate: already done (%s)', out.path)
    return
  module = hovernet.create_hovernet(**config.hovernet.model)
  tiles = input_pipeline.load_split(config, workdir, 'test')
  for name in names:
    if not wdir.eval_json(workdir, name).exists():
      _evaluate_run(config, workdir, name, tiles, module, out)
  if synthetic and not wdir.eval_json(workdir, wdir.SYNTHETIC_FIDELITY).exists():
    # The baseline model (real data only) reads every synthetic patch at its own size, padded as
    # test tiles are, scored against the patch's own labels: is each class rendered recognisably?
    from diffmix_jax.hovernet import patches as hovernet_data  # pylint: disable=g-import-not-at-top
    _evaluate_run(config, workdir, arms.fidelity_run(config),
                  hovernet_data.read_synthetic(synthetic), module, out, label=wdir.SYNTHETIC_FIDELITY)
  if jax.process_index() == 0:
    out.mark_done({'runs': names, 'tiles': len(tiles)})
