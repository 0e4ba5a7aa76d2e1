"""`python -m diffmix_jax.build_data --dataset D [--manual_dir DIR] [--data_dir TFDS] [--labels L]`:
builds a dataset into TFDS without the rest of the chain and prints its nuclei per class (the
`build_data` stage is diffmix_jax/stages/build_data.py). CoNIC takes --conic_exclude,
--conic_test_fraction, --conic_split_seed; PanNuke --pannuke_train_folds, --pannuke_test_folds.
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
    options = {}
    if f.dataset == 'conic':
      options = {'exclude': tuple(f.conic_exclude),
                 'test_fraction': f.conic_test_fraction, 'split_seed': f.conic_split_seed}
    elif f.dataset == 'pannuke':
      options = {'train_folds': tuple(int(k) for k in f.pannuke_train_folds),
                 'test_folds': tuple(int(k) for k in f.pannuke_test_folds)}
    summary = build_data.build(f.dataset, f.data_dir, f.manual_dir, f.labels, **options)
  except (ValueError, FileNotFoundError) as e:
    print(f'build_data: error: {e}', file=sys.stderr)
    sys.exit(2)
  print(build_data.format_summary(summary))
  print(json.dumps(summary, indent=2))


if __name__ == '__main__':
  flags.DEFINE_enum('dataset', None, ['consep', 'glysac', 'demo_nuclei', 'conic', 'pannuke',
                                      'nuclei_folder'], 'Dataset to build.')
  flags.DEFINE_string('manual_dir', '', 'The dataset\'s folder (README "Your own data"; not for '
                      'demo_nuclei).')
  flags.DEFINE_string('data_dir', os.path.expanduser('~/tensorflow_datasets'),
                      'TFDS data_dir to write the built dataset to.')
  flags.DEFINE_enum('labels', 'original', ['original', 'merged'],
                    'Class ids in the label files: original (merged here) or merged.')
  flags.DEFINE_list('conic_exclude', [], 'CoNIC cohorts to leave out (comma list, e.g. consep).')
  flags.DEFINE_float('conic_test_fraction', 0.2, 'CoNIC: share of each cohort\'s source images in test.')
  flags.DEFINE_integer('conic_split_seed', 0, 'CoNIC: seed of the test draw.')
  flags.DEFINE_list('pannuke_train_folds', ['1', '2'], 'PanNuke folds of the train split.')
  flags.DEFINE_list('pannuke_test_folds', ['3'], 'PanNuke folds of the test split.')
  flags.mark_flag_as_required('dataset')
  app.run(main)
