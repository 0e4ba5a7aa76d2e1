"""Entry point: runs the stages of `config.stages` in order in one workdir.

  python -m diffmix_jax.main --config configs/demo.py --workdir runs/demo [--config.a.b=value]

Each stage is `run(config, workdir)`, resumes from its own files and returns at once when done.
"""

import importlib
import json
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from diffmix_jax import config_checks
from diffmix_jax.data import datasets
from diffmix_jax import workdir as wdir

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Folder for every stage output and checkpoint.')

# Stages run by process 0 only (they write host files the other processes then read); the others run
# in every process.
HOST_STAGES = ('build_data', 'mix_labels', 'report')


def stage_fn(name: str):
  """The `run` function of stage `name` (diffmix_jax/stages/<name>.py)."""
  return importlib.import_module(f'diffmix_jax.stages.{name}').run


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config, workdir = _CONFIG.value, _WORKDIR.value
  if not workdir:
    raise app.UsageError('--workdir is required')
  try:
    datasets.resolve_classes(config, workdir)  # Class fields left to the dataset's table (0, ()).
    stages = config_checks.check(config, workdir)  # Every value, before any stage runs.
  except ValueError as e:
    print(f'main: error: {e}', file=sys.stderr)
    sys.exit(2)
  import jax  # pylint: disable=g-import-not-at-top  (after the checks; distributed init comes first)
  from diffmix_jax.core import checkpoint  # pylint: disable=g-import-not-at-top
  from diffmix_jax.core import sharding  # pylint: disable=g-import-not-at-top
  checkpoint.quiet_orbax_logs()
  if config.mesh.distributed:
    sharding.initialize_distributed(config.mesh)
  os.makedirs(workdir, exist_ok=True)
  # Persistent: a rerun after a kill or a second run compiles less. JAX_COMPILATION_CACHE_DIR (set by
  # launch/gpu.sh) takes precedence.
  if config.compilation_cache and not jax.config.jax_compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir', os.path.join(workdir, wdir.COMPILATION_CACHE))
  logging.info('process %d/%d, devices: %s', jax.process_index(), jax.process_count(),
               jax.devices())
  if jax.process_index() == 0:
    wdir.atomic_write(os.path.join(workdir, wdir.CONFIG), config.to_json_best_effort(indent=2).encode())
  timings_path = os.path.join(workdir, wdir.TIMINGS)
  timings = json.load(open(timings_path)) if os.path.exists(timings_path) else {}
  for name in stages:
    run = stage_fn(name)
    logging.info('=== stage %s ===', name)
    start = time.time()
    if name not in HOST_STAGES or jax.process_index() == 0:
      try:
        run(config, workdir)
      except checkpoint.CheckpointMismatch as e:  # A changed config over old checkpoints.
        print(f'main: error: {name}: {e}', file=sys.stderr)
        sys.exit(1)
    if jax.process_count() > 1:  # Host-only stages write files the other processes read next.
      sharding.barrier(f'stage {name} finished')
    seconds = time.time() - start
    logging.info('=== stage %s finished in %.1f s ===', name, seconds)
    timings[name] = round(max(seconds, timings.get(name, 0.0)), 3)  # A no-op rerun keeps the first.
    if jax.process_index() == 0:
      wdir.atomic_write(timings_path, json.dumps(timings, indent=2).encode())


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
