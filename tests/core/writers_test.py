"""Progress logging and the writers: known rates and ETAs; TensorFlow only where needed."""

import logging
import subprocess
import sys

from diffmix_jax.core import writers


def test_progress_logs_rate_and_eta_from_the_clock(monkeypatch, caplog):
  clock = iter([0.0, 4.0, 10.0, 25.0, 40.0])
  monkeypatch.setattr(writers.time, 'monotonic', lambda: next(clock))
  caplog.set_level(logging.INFO)
  progress = writers.create_progress(20, every_secs=10.0)
  progress(0)   # t=0: starts the clock, logs nothing (the first step compiles).
  progress(2)   # t=4: under 10 s since the last line.
  progress(5)   # t=10: 5 steps in 10 s -> 0.5 steps/s, 15 to go -> 30 s.
  progress(11)  # t=25: 6 steps in 15 s -> 0.4 steps/s, 9 to go -> 22.5 s, rounds to 22 s.
  progress(20)  # t=40: the last step is always logged: 9 in 15 s, nothing to go.
  lines = [r.getMessage() for r in caplog.records if 'steps/s' in r.getMessage()]
  assert lines == ['step 5/20 (25.0 %), 0.5 steps/s, ETA 0m30s',
                   'step 11/20 (55.0 %), 0.4 steps/s, ETA 0m22s',
                   'step 20/20 (100.0 %), 0.6 steps/s, ETA 0m00s']


def test_log_writer_logs_scalars_and_drops_images(caplog):
  caplog.set_level(logging.INFO)
  w = writers.LogWriter()
  w.write_scalars(7, {'loss': 0.25, 'lr': 1e-4})
  w.write_images(7, {'grid': None})
  w.flush()
  assert [r.getMessage() for r in caplog.records] == ['[7] loss=0.25, lr=0.0001']


def test_stage_modules_and_progress_do_not_import_tensorflow():
  """Only process 0's TensorBoard writer needs TensorFlow (~8 CPU-s to import)."""
  code = ('import sys\n'
          'from diffmix_jax.stages import diffusion_train, evaluate, hovernet_train, sample\n'
          'from diffmix_jax.core import loop, writers\n'
          'writers.create_progress(3)(1)\n'
          'writers.LogWriter().write_scalars(1, {"a": 1.0})\n'
          'print("tensorflow" in sys.modules)\n')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == 'False', out.stderr[-2000:]
