"""What `config.data` says about the dataset, read without TFDS or JAX (docs/datasets.md).

The builder options of `data.conic` / `data.pannuke`, and the dataset's class table: fixed for the
published sets, `<manual_dir>/classes.json` for a `nuclei_folder` (or, once built, the copy in
`<workdir>/build_data/summary.json`). `resolve_classes` fills the class fields a config leaves to
the table (0 or ()) and checks the class count against it; `main` calls it before the config
checks and any stage.
"""

import json
import os
from typing import Any

import ml_collections

from diffmix_jax import workdir as wdir
from tfds_builders import class_tables

# Class fields and the value that means "read it from the dataset's class table"
# (diffusion.model.num_classes and hovernet.model.nr_types are tied to data.num_classes).
AUTO_FIELDS = {'data.num_classes': 0, 'data.class_names': (), 'mix.balance.rare_classes': (),
               'mix.balance.common_classes': ()}


# The folder each builder reads (`data.manual_dir`), for errors and help.
_FOLDERS = {'conic': 'the folder holding images.npy, labels.npy and patch_info.csv',
            'pannuke': "the folder holding 'Fold 1/', 'Fold 2/' and 'Fold 3/'",
            'nuclei_folder': 'the folder holding classes.json, Train/ and Test/'}


def folder_layout(name: str) -> str:
  """What `data.manual_dir` must hold for dataset `name`."""
  return _FOLDERS.get(name, 'the folder holding Train/ and Test/')


def builder_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Keyword options of `registry.create_builder` for `config.data.name` ({} for most datasets)."""
  d = config.data
  if d.name == 'conic':
    return {'exclude': tuple(d.conic.exclude),
            'test_fraction': float(d.conic.test_fraction), 'split_seed': int(d.conic.split_seed)}
  if d.name == 'pannuke':
    return {'train_folds': tuple(d.pannuke.train_folds),
            'test_folds': tuple(d.pannuke.test_folds)}
  if d.name == 'nuclei_folder':  # Each folder has its own build, named by its path.
    if not d.manual_dir:
      raise ValueError('config.data.manual_dir is empty: a nuclei_folder dataset is found by its '
                       'folder (the one holding classes.json, Train/ and Test/)')
    return {'folder': os.path.abspath(d.manual_dir)}
  return {}


def manual_dir(config: ml_collections.ConfigDict) -> str:
  """The raw dataset folder: `data.manual_dir`, else $DIFFMIX_CONSEP_DIR for CoNSeP ('' if neither)."""
  return config.data.manual_dir or (os.environ.get('DIFFMIX_CONSEP_DIR', '')
                                    if config.data.name == 'consep' else '')


def class_table(config: ml_collections.ConfigDict, workdir: str = ''
                ) -> class_tables.ClassTable | None:
  """The class table of the configured dataset, or None when a nuclei_folder's table is out of
  reach (no built summary in `workdir` and no `classes.json` in the manual_dir).

  Raises:
    class_tables.ClassTableError: a malformed classes.json (named).
  """
  name = config.data.name
  if name in class_tables.FIXED:
    return class_tables.FIXED[name]
  built = None
  summary = os.path.join(workdir, wdir.BUILD_DATA, wdir.SUMMARY) if workdir else ''
  if summary and os.path.exists(summary):  # Written with the build: its copy of classes.json.
    with open(summary) as f:
      record = json.load(f)
    if record.get('dataset') == name and record.get('classes'):
      built = class_tables.parse(record['classes'], summary)
  root = manual_dir(config)
  if root and os.path.isfile(os.path.join(root, class_tables.CLASSES_FILE)):
    table = class_tables.read(root)
    if built is not None and built != table:
      raise ValueError(f'{os.path.join(root, class_tables.CLASSES_FILE)} differs from the table '
                       f'this workdir was built with ({summary}); restore it, or start a new '
                       'workdir to rebuild')
    return table
  return built


def _get(c: ml_collections.ConfigDict, field: str) -> Any:
  for part in field.split('.'):
    c = c[part]
  return c


def _set(c: ml_collections.ConfigDict, field: str, value: Any) -> None:
  *path, last = field.split('.')
  for part in path:
    c = c[part]
  c[last] = value


def resolve_classes(config: ml_collections.ConfigDict, workdir: str = '') -> None:
  """Fills the class fields left to the dataset's class table (AUTO_FIELDS), in place, then
  `check_classes`. Names, rare and common classes set in the config are kept: the table's are
  defaults (config_checks then checks them against the count). `main` calls it before the checks.

  Raises:
    ValueError: as `check_classes`.
  """
  table = class_table(config, workdir)
  if table is not None:
    values = {'data.num_classes': table.num_classes, 'data.class_names': tuple(table.names),
              'mix.balance.rare_classes': tuple(table.rare),
              'mix.balance.common_classes': tuple(table.common)}
    for field, auto in AUTO_FIELDS.items():
      if _get(config, field) == auto:
        _set(config, field, values[field])
  check_classes(config, workdir, table)


_UNREAD = object()


def check_classes(config: ml_collections.ConfigDict, workdir: str = '', table=_UNREAD) -> None:
  """Checks the class fields against the dataset's class table (`table`, read when not given);
  changes nothing.

  Raises:
    ValueError: a field still left to the table (the table out of reach, or `resolve_classes` not
      called), or a class count the table does not have (naming the field, the table, its classes).
  """
  if table is _UNREAD:
    table = class_table(config, workdir)
  auto = [f for f, v in AUTO_FIELDS.items() if _get(config, f) == v]
  if auto and table is None:
    raise ValueError(f'config.{auto[0]}={AUTO_FIELDS[auto[0]]!r} reads the class table of '
                     f'{config.data.name}, which is out of reach: set config.data.manual_dir to '
                     f'the folder holding {class_tables.CLASSES_FILE} (or build the dataset first)')
  if auto:
    raise ValueError(f'config.{auto[0]}={AUTO_FIELDS[auto[0]]!r} is left to the {config.data.name} '
                     'class table: data.datasets.resolve_classes fills it (main calls it first)')
  if table is not None and config.data.num_classes != table.num_classes:
    raise ValueError(f'config.data.num_classes={config.data.num_classes}: must be '
                     f'{table.num_classes}, the class count of the {config.data.name} class table '
                     f'({", ".join(table.names)}), or 0 to read it from the table')
