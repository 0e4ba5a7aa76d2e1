"""Where a run's numbers go: TensorBoard writers, the progress line, the start-of-run overview.

CLU's writers import TensorFlow (~8 CPU-s); only a process that writes TensorBoard pays for it:
process 0's writers. Progress and the other processes' writers log through absl alone.
"""

import time

import jax
import numpy as np
from absl import logging


class LogWriter:
  """The writer of processes other than 0: scalars to the log, images dropped (no TensorBoard)."""

  def write_scalars(self, step: int, scalars: dict) -> None:
    logging.info('[%d] %s', step, ', '.join(f'{k}={float(v):.6g}' for k, v in scalars.items()))

  def write_images(self, step: int, images: dict) -> None:
    del step, images

  def flush(self) -> None:
    pass


def create_writer(logdir: str):
  """CLU's TensorBoard writer (and log) on process 0; a `LogWriter` elsewhere."""
  if jax.process_index() > 0:
    return LogWriter()
  from clu import metric_writers  # pylint: disable=g-import-not-at-top  (imports TensorFlow)
  return metric_writers.create_default_writer(logdir, asynchronous=False)


def create_progress(total_steps: int, every_secs: float = 30.0):
  """`progress(step)`: logs step, steps/s and ETA at most every `every_secs` and at the last step
  (the training loop writes its rates to TensorBoard itself)."""
  last = {'time': None, 'step': None}

  def progress(step: int) -> None:
    now = time.monotonic()
    if last['step'] is None:  # The first call only starts the clock (it includes compiling).
      last.update(time=now, step=step)
      return
    if now - last['time'] < every_secs and step < total_steps:
      return
    rate = (step - last['step']) / max(now - last['time'], 1e-9)
    eta = (total_steps - step) / rate if rate > 0 else float('inf')
    logging.info('step %d/%d (%.1f %%), %.3g steps/s, ETA %s', step, total_steps,
                 100.0 * step / max(total_steps, 1), rate, _duration(eta))
    last.update(time=now, step=step)

  return progress


def _duration(seconds: float) -> str:
  if not np.isfinite(seconds):
    return '?'
  m, s = divmod(int(round(seconds)), 60)
  h, m = divmod(m, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'


def log_overview(config, params) -> None:
  """Logs the config and the parameter table (names, shapes, sizes) at the start of a run."""
  from clu import parameter_overview  # pylint: disable=g-import-not-at-top
  logging.info('config:\n%s', config)
  logging.info('parameters:\n%s', parameter_overview.get_parameter_overview(params))
