"""`python -m diffmix_jax.evaluate --true_dir T --pred_dir P [--out metrics.json]`: scores a folder of
predicted `.mat` records against a folder of ground-truth ones (formats in diffmix_jax/metrics/records.py;
no JAX). The `evaluate` stage of the chain is diffmix_jax/stages/evaluate.py.
"""

import sys
from typing import Sequence

from absl import app
from absl import flags

from diffmix_jax.metrics import records


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  try:
    metrics = records.evaluate_dirs(f.true_dir, f.pred_dir)
  except ValueError as e:
    print(f'evaluate: error: {e}', file=sys.stderr)
    sys.exit(2)
  print(records.format_table(metrics))
  if f.out:
    records.write_json(metrics, f.out)
    print(f'wrote {f.out}')


if __name__ == '__main__':
  # Flags are defined here, not at import, so stages can import this module without them.
  flags.DEFINE_string('true_dir', None, 'Folder of ground-truth <name>.mat files.')
  flags.DEFINE_string('pred_dir', None, 'Folder of predicted <name>.mat files (the same names).')
  flags.DEFINE_string('out', '', 'Path of the metrics JSON ("" = print only).')
  flags.mark_flags_as_required(['true_dir', 'pred_dir'])
  app.run(main)
