"""Builds a dataset with our TFDS builders (no `tfds` CLI, no network) and summarises it.

  python -m diffmix_jax.build_data --dataset consep --labels merged \
      --manual_dir ../shared/data/consep --data_dir ~/tensorflow_datasets

Also the `build_data` stage: builds `config.data.name` into `config.data.data_dir` (default
`<workdir>/tfds`) and writes `<workdir>/build_data/summary.json`.
"""

import json
import pathlib

from absl import logging
import ml_collections
import numpy as np

from diffmix_jax import config_checks
from diffmix_jax.core import fields
from diffmix_jax.data import input_pipeline
from diffmix_jax import workdir as wdir


def build(dataset: str, data_dir: str, manual_dir: str = '', labels: str = 'original') -> dict:
  """Builds (or reuses) the dataset and returns its summary.

  Args:
    dataset: 'consep', 'glysac' or 'demo_nuclei'.
    data_dir: TFDS data_dir to write to.
    manual_dir: folder with {Train,Test}/{Images,Labels} (unused for demo_nuclei).
    labels: 'original' or 'merged': which class ids the label files hold.

  Returns:
    The summary of `summarize`.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tfds_builders import registry  # pylint: disable=g-import-not-at-top
  if dataset == 'demo_nuclei':
    labels = 'merged'  # Generated directly in merged ids.
  else:
    if not manual_dir:
      raise ValueError(f'--manual_dir is required for {dataset}: the folder holding Train/ and Test/')
    if not pathlib.Path(manual_dir).is_dir():
      raise FileNotFoundError(f'manual_dir {manual_dir} does not exist; expected the folder holding '
                              'Train/ and Test/')
  builder = registry.create_builder(dataset, data_dir, labels)
  # TFDS writes into a temporary folder and renames it when complete, so a killed build is redone.
  builder.download_and_prepare(
      file_format='array_record',
      download_config=tfds.download.DownloadConfig(
          manual_dir=manual_dir or None, try_download_gcs=False))
  return summarize(dataset, data_dir, labels)


def summarize(dataset: str, data_dir: str, labels: str) -> dict:
  """Tiles per split and nuclei per merged class per split, read back from the built dataset."""
  out = {'dataset': dataset, 'labels': labels, 'data_dir': str(data_dir), 'splits': {}}
  for split in ('train', 'test'):
    src = input_pipeline.open_source(dataset, data_dir, labels, split)
    counts, empty = {}, 0
    for i in range(len(src)):
      ex = src[i]
      per_class = nuclei_per_class(ex['inst_map'], ex['type_map'])
      empty += int(not per_class)
      for c, n in per_class.items():
        counts[str(c)] = counts.get(str(c), 0) + n
    out['splits'][split] = {'tiles': len(src), 'empty_tiles': empty,
                            'nuclei': int(sum(counts.values())),
                            'nuclei_per_class': dict(sorted(counts.items()))}
  return out


def nuclei_per_class(inst_map: np.ndarray, type_map: np.ndarray) -> dict[int, int]:
  """Counts instances by their (constant) class.

  Args:
    inst_map: int32 [H, W], ids 1..N.
    type_map: int32 [H, W], constant over each instance.

  Returns:
    {class id: number of instances} for classes present.
  """
  n = int(inst_map.max()) if inst_map.size else 0
  if n == 0:
    return {}
  cls = np.zeros(n + 1, np.int64)
  cls[inst_map.ravel()] = type_map.ravel()
  ids, counts = np.unique(cls[1:], return_counts=True)
  return {int(i): int(c) for i, c in zip(ids, counts)}


# What a reader of a dataset's summary table must know about how its splits were drawn.
SPLIT_NOTES = {
    'demo_nuclei': ('train is imbalanced like CoNSeP (rare class 1 in ~1/3 of the tiles, 1-2 each); '
                    'test is enriched in the rare class (8-10 per tile) so that its F_c can be '
                    'measured; the splits are drawn from separate random streams'),
}


def format_summary(summary: dict, class_names=None) -> str:
  """A readable table of `summarize`'s output (and the dataset's SPLIT_NOTES)."""
  lines = [f"{summary['dataset']} ({summary['labels']} labels) in {summary['data_dir']}"]
  classes = sorted({int(c) for s in summary['splits'].values() for c in s['nuclei_per_class']})
  head = ['split', 'tiles', 'empty', 'nuclei'] + [
      class_names[c] if class_names else f'class {c}' for c in classes]
  rows = [head]
  for split, s in summary['splits'].items():
    rows.append([split, s['tiles'], s['empty_tiles'], s['nuclei']] + [
        s['nuclei_per_class'].get(str(c), 0) for c in classes])
  widths = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
  for r in rows:
    lines.append('  '.join(str(v).rjust(w) for v, w in zip(r, widths)))
  if summary['dataset'] in SPLIT_NOTES:
    lines.append(f"note: {SPLIT_NOTES[summary['dataset']]}")
  return '\n'.join(lines)


def data_dir_for(config: ml_collections.ConfigDict, workdir: str) -> str:
  """`config.data.data_dir`, or `<workdir>/tfds` when it is empty."""
  return wdir.tfds_dir(config, workdir)


def manual_dir_for(config: ml_collections.ConfigDict) -> str:
  """`config.data.manual_dir`, or $DIFFMIX_CONSEP_DIR for CoNSeP when it is empty."""
  if config.data.name == 'demo_nuclei':
    return config.data.manual_dir
  root = config_checks.manual_dir(config)
  if not root:
    raise ValueError(f'config.data.manual_dir is empty: set it to the {config.data.name} folder '
                     'holding Train/ and Test/ (--config.data.manual_dir=DIR)')
  return root


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Stage `build_data`: builds the configured dataset and writes its summary (no-op when done)."""
  out = wdir.StageDir(workdir, wdir.BUILD_DATA)
  if out.done():
    logging.info('build_data: already done (%s)', out.path)
    return
  summary = build(config.data.name, data_dir_for(config, workdir), manual_dir_for(config),
                  config.data.labels)
  names = fields.names(config.data.class_names)
  logging.info('build_data summary:\n%s', format_summary(summary, names))
  out.write_text(wdir.SUMMARY, json.dumps(summary, indent=2))
  out.mark_done()
