"""The TFDS builders by name (importing this module registers every one with TFDS)."""

from tfds_builders.conic import conic
from tfds_builders.consep.consep import Consep
from tfds_builders.demo_nuclei.demo_nuclei import DemoNuclei
from tfds_builders.glysac.glysac import Glysac
from tfds_builders.nuclei_folder import nuclei_folder
from tfds_builders.pannuke import pannuke

BUILDERS = {'consep': Consep, 'glysac': Glysac, 'demo_nuclei': DemoNuclei, 'conic': conic.Conic,
            'pannuke': pannuke.Pannuke, 'nuclei_folder': nuclei_folder.NucleiFolder}
# Builder options by dataset (keyword arguments of create_builder).
OPTIONS = {'conic': ('exclude', 'test_fraction', 'split_seed'),
           'pannuke': ('train_folds', 'test_folds'), 'nuclei_folder': ('folder',)}


def create_builder(dataset: str, data_dir: str, labels: str = 'original', **options):
  """The builder of `dataset` in `data_dir`.

  Args:
    dataset: a name of BUILDERS.
    data_dir: the TFDS data_dir.
    labels: for consep and glysac, the ids the label files hold ('original' | 'merged'); the others
      have one scheme (the demo set's merged ids, the fixed CoNIC/PanNuke ids, classes.json).
    **options: the dataset's OPTIONS (conic: exclude, test_fraction, split_seed; pannuke:
      train_folds, test_folds; nuclei_folder: folder, required); each builder config's name
      spells them.
  """
  if dataset not in BUILDERS:
    raise ValueError(f'unknown dataset {dataset!r}; expected one of {sorted(BUILDERS)}')
  unknown = sorted(set(options) - set(OPTIONS.get(dataset, ())))
  if unknown:
    raise ValueError(f'{dataset} takes no builder option(s) {unknown}')
  if dataset == 'conic':
    config = conic.config_for(**options)
  elif dataset == 'pannuke':
    config = pannuke.config_for(**options)
  elif dataset == 'nuclei_folder':
    if not options.get('folder'):
      raise ValueError('nuclei_folder needs its folder (the manual_dir it was built from)')
    config = nuclei_folder.config_for(options['folder'])
  elif dataset in ('consep', 'glysac'):
    if labels not in ('original', 'merged'):
      raise ValueError(f'label scheme must be original or merged; got {labels!r}')
    config = labels
  else:
    config = BUILDERS[dataset].BUILDER_CONFIGS[0].name
  if not isinstance(config, str) and config.name in {
      c.name for c in BUILDERS[dataset].BUILDER_CONFIGS}:
    config = config.name  # TFDS takes a registered config by name only.
  return BUILDERS[dataset](data_dir=data_dir, config=config)
