"""Entry point: runs the stages of `config.stages` in order in one workdir.

  python -m diffmix_jax.main --config configs/demo.py --workdir runs/demo [--config.a.b=value]

Each stage is `run(config, workdir)`, resumes from its own files and returns at once when done.
"""

import importlib
import json
import os
import time

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from diffmix_jax import config_checks
from diffmix_jax import stage_files

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Folder for every stage output and checkpoint.')

# Stage name -> (module that owns it, issue that builds it).
STAGES = {
    'build_data': ('diffmix_jax.build_data', 3),
    'diffusion_train': ('diffmix_jax.diffusion_train', 7),
    'mix_labels': ('diffmix_jax.mix_labels', 6),
    'sample': ('diffmix_jax.sample', 9),
    'hovernet_train': ('diffmix_jax.hovernet_train', 8),
    'evaluate': ('diffmix_jax.evaluate', 8),
    'report': ('diffmix_jax.report', 10),
}


def stage_fn(name: str):
  """The `run` function of stage `name`; NotImplementedError when its module does not exist yet."""
  module, issue = STAGES[name]
  try:
    mod = importlib.import_module(module)
  except ModuleNotFoundError as e:
    if e.name != module:
      raise
    mod = None
  if mod is None or not hasattr(mod, 'run'):
    raise NotImplementedError(f'stage {name!r} is not implemented yet ({module}.run, issue #{issue}); '
                              f'run the stages before it with --config.stages=...')
  return mod.run


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config, workdir = _CONFIG.value, _WORKDIR.value
  if not workdir:
    raise app.UsageError('--workdir is required')
  config_checks.validate(config)
  import jax  # pylint: disable=g-import-not-at-top  (after flags: distributed init comes first)
  if config.mesh.distributed:
    jax.distributed.initialize(initialization_timeout=config.mesh.initialization_timeout,
                               heartbeat_timeout_seconds=config.mesh.heartbeat_timeout)
  logging.info('process %d/%d, devices: %s', jax.process_index(), jax.process_count(),
               jax.devices())
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    stage_files.atomic_write(os.path.join(workdir, 'config.json'),
                             config.to_json_best_effort(indent=2).encode())
  timings = {}
  for name in [s.strip() for s in config.stages.split(',') if s.strip()]:
    run = stage_fn(name)
    logging.info('=== stage %s ===', name)
    start = time.time()
    run(config, workdir)
    timings[name] = round(time.time() - start, 3)
    logging.info('=== stage %s finished in %.1f s ===', name, timings[name])
  if jax.process_index() == 0:
    stage_files.atomic_write(os.path.join(workdir, 'timings_last_run.json'),
                             json.dumps(timings, indent=2).encode())


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
