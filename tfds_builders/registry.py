"""The TFDS builders by name (importing this module registers consep, glysac, demo_nuclei with TFDS)."""

from tfds_builders.consep.consep import Consep
from tfds_builders.demo_nuclei.demo_nuclei import DemoNuclei
from tfds_builders.glysac.glysac import Glysac

BUILDERS = {'consep': Consep, 'glysac': Glysac, 'demo_nuclei': DemoNuclei}


def create_builder(dataset: str, data_dir: str, labels: str):
  """The builder of `dataset` in `data_dir`; its config is the label scheme ('original' | 'merged').

  The demo set is generated in merged ids, so it always uses 'merged'.
  """
  if dataset not in BUILDERS:
    raise ValueError(f'unknown dataset {dataset!r}; expected one of {sorted(BUILDERS)}')
  if labels not in ('original', 'merged'):
    raise ValueError(f'label scheme must be original or merged; got {labels!r}')
  return BUILDERS[dataset](data_dir=data_dir,
                           config='merged' if dataset == 'demo_nuclei' else labels)
