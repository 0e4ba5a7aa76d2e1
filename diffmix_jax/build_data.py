"""`python -m diffmix_jax.build_data --dataset D [--manual_dir DIR] [--data_dir TFDS] [--labels L]`:
builds a dataset into TFDS without the rest of the chain (the `build_data` stage is
diffmix_jax/stages/build_data.py).
"""

import json
import os
import sys

from absl import app
from absl import flags

from diffmix_jax.stages import build_data


def main(argv):
  del argv
  f = flags.FLAGS
  try:
    summary = build_data.build(f.dataset, f.data_dir, f.manual_dir, f.labels)
  except (ValueError, FileNotFoundError) as e:
    print(f'build_data: error: {e}', file=sys.stderr)
    sys.exit(2)
  print(build_data.format_summary(summary))
  print(json.dumps(summary, indent=2))


if __name__ == '__main__':
  flags.DEFINE_enum('dataset', None, ['consep', 'glysac', 'demo_nuclei'], 'Dataset to build.')
  flags.DEFINE_string('manual_dir', '', 'Folder holding Train/ and Test/ (not for demo_nuclei).')
  flags.DEFINE_string('data_dir', os.path.expanduser('~/tensorflow_datasets'),
                      'TFDS data_dir to write the built dataset to.')
  flags.DEFINE_enum('labels', 'original', ['original', 'merged'],
                    'Class ids in the label files: original (merged here) or merged.')
  flags.mark_flag_as_required('dataset')
  app.run(main)
