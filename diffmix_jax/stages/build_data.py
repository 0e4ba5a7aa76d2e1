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

from diffmix_jax.data import datasets
from diffmix_jax.data import input_pipeline
from diffmix_jax import workdir as wdir
from tfds_builders import class_tables


def build(dataset: str, data_dir: str, manual_dir: str = '', labels: str = 'original',
          **options) -> dict:
  """Builds (or reuses) the dataset and returns its summary.

  Args:
    dataset: a builder name (tfds_builders/registry.py).
    data_dir: TFDS data_dir to write to.
    manual_dir: the folder the builder reads (datasets.folder_layout; unused for demo_nuclei).
    labels: CoNSeP/GLySAC: 'original' or 'merged', which class ids the label files hold.
    **options: builder options (conic: exclude, test_fraction, split_seed; pannuke: train_folds,
      test_folds; nuclei_folder: folder, default manual_dir).

  Returns:
    The summary of `summarize`.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tfds_builders import registry  # pylint: disable=g-import-not-at-top
  if dataset == 'demo_nuclei':
    labels = 'merged'  # Generated directly in merged ids.
  else:
    if not manual_dir:
      raise ValueError(f'--manual_dir is required for {dataset}: '
                       f'{datasets.folder_layout(dataset)}')
    if not pathlib.Path(manual_dir).is_dir():
      raise FileNotFoundError(f'manual_dir {manual_dir} does not exist; expected '
                              f'{datasets.folder_layout(dataset)}')
  if dataset == 'nuclei_folder':
    options.setdefault('folder', str(pathlib.Path(manual_dir).resolve()))
  builder = registry.create_builder(dataset, data_dir, labels, **options)
  # TFDS writes into a temporary folder and renames it when complete, so a killed build is redone.
  builder.download_and_prepare(
      file_format='array_record',
      download_config=tfds.download.DownloadConfig(
          manual_dir=manual_dir or None, try_download_gcs=False))
  if dataset == 'nuclei_folder':
    registry.create_builder(dataset, data_dir, **options).check_current()  # Not a stale build.
  return summarize(dataset, data_dir, labels, **options)


def summarize(dataset: str, data_dir: str, labels: str, **options) -> dict:
  """Tiles per split and nuclei per class per split, read back from the built dataset, with the
  dataset's class table (`classes`) and, where the builder drew it, its split record (`split`)."""
  out = {'dataset': dataset, 'labels': labels, 'data_dir': str(data_dir), 'splits': {}}
  for split in ('train', 'test'):
    src = input_pipeline.open_source(dataset, data_dir, labels, split, **options)
    counts, empty = {}, 0
    for i in range(len(src)):
      ex = src[i]
      per_class = nuclei_per_class(ex['inst_map'], ex['type_map'])
      empty += int(not per_class)
      for c, n in per_class.items():
        counts[str(c)] = counts.get(str(c), 0) + n
    out['splits'][split] = {'tiles': len(src), 'empty_tiles': empty,
                            'nuclei': int(sum(counts.values())),
                            'nuclei_per_class': dict(sorted(counts.items(), key=lambda kv: int(kv[0])))}
  metadata = input_pipeline.dataset_metadata(dataset, data_dir, labels, **options)
  out['classes'] = metadata.get('classes') or class_tables.FIXED[dataset].to_json()
  if 'split' in metadata:
    out['split'] = metadata['split']
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
  """A readable table of `summarize`'s output: nuclei per class of the dataset's class table (rare
  classes starred, each class's share of the split's nuclei), then how the splits were drawn."""
  table = summary.get('classes') or {}
  names = list(class_names or table.get('names') or [])
  rare = set(table.get('rare', ()))
  counted = {int(c) for s in summary['splits'].values() for c in s['nuclei_per_class']}
  classes = sorted(counted | set(range(1, len(names))))
  label = lambda c: (names[c] if c < len(names) else f'class {c}') + ('*' if c in rare else '')
  scheme = f" ({summary['labels']} labels)" if summary['dataset'] in ('consep', 'glysac') else ''
  lines = [f"{summary['dataset']}{scheme} in {summary['data_dir']}"]
  rows = [['split', 'tiles', 'empty', 'nuclei'] + [label(c) for c in classes]]
  for split, s in summary['splits'].items():
    n = max(s['nuclei'], 1)
    rows.append([split, s['tiles'], s['empty_tiles'], s['nuclei']] + [
        f"{s['nuclei_per_class'].get(str(c), 0)} ({100 * s['nuclei_per_class'].get(str(c), 0) / n:.1f}%)"
        for c in classes])
  widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
  for r in rows:
    lines.append('  '.join(str(v).rjust(w) for v, w in zip(r, widths)))
  if rare:
    lines.append('* rare (mix.balance.rare_classes of the class table); common: '
                 + ', '.join(label(c) for c in table.get('common', ())))
  if summary['dataset'] in SPLIT_NOTES:
    lines.append(f"note: {SPLIT_NOTES[summary['dataset']]}")
  split = summary.get('split')
  if split and 'test_folds' in split:
    lines.append(f"split: folds {split['train_folds']} train, {split['test_folds']} test")
  elif split:
    lines.append(f"split: {len(split['train'])} train / {len(split['test'])} test source images, "
                 f"{split['test_fraction']:g} of each cohort's drawn for test with seed "
                 f"{split['seed']}; left out: {', '.join(split['excluded']) or 'none'}")
  return '\n'.join(lines)


def data_dir_for(config: ml_collections.ConfigDict, workdir: str) -> str:
  """`config.data.data_dir`, or `<workdir>/tfds` when it is empty."""
  return wdir.tfds_dir(config, workdir)


def manual_dir_for(config: ml_collections.ConfigDict) -> str:
  """`config.data.manual_dir`, or $DIFFMIX_CONSEP_DIR for CoNSeP when it is empty."""
  if config.data.name == 'demo_nuclei':
    return config.data.manual_dir
  root = datasets.manual_dir(config)
  if not root:
    raise ValueError(f'config.data.manual_dir is empty: set it to '
                     f'{datasets.folder_layout(config.data.name)} (--config.data.manual_dir=DIR)')
  return root


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Stage `build_data`: builds the configured dataset and writes its summary (no-op when done)."""
  out = wdir.StageDir(workdir, wdir.BUILD_DATA)
  if out.done():
    logging.info('build_data: already done (%s)', out.path)
    return
  summary = build(config.data.name, data_dir_for(config, workdir), manual_dir_for(config),
                  config.data.labels, **datasets.builder_options(config))
  print(f'build_data summary:\n{format_summary(summary, list(config.data.class_names))}')
  out.write_text(wdir.SUMMARY, json.dumps(summary, indent=2))
  out.mark_done()
