"""Two processes over 127.0.0.1 share three slides through claim files: each slide is predicted once
and the outputs equal one process's. One simulated CPU device per process;
three one-tile slides (256 px, 4 windows each) and the tiny random HoVer-Net of tests/predict_test.py."""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from conftest import HANG_TIMEOUT
from conftest import free_port
from conftest import xla_flags
import slide_files

pytestmark = [pytest.mark.slow]
REPO = pathlib.Path(__file__).resolve().parents[2]
STEMS = ('s0', 's1', 's2')
OUTPUTS = ('nuclei.geojson', 'nuclei.json', 'nuclei.parquet', 'thumbnail.png', 'tissue_mask.png')


def _command(model, slides, out, *extra):
  return [sys.executable, '-m', 'diffmix_jax.predict', f'--model_dir={model}', f'--out={out}',
          '--workers=0', '--batch_size=4', *extra, '--slides', str(slides)]


def test_two_processes_share_three_slides(tmp_path):
  slide_files.write_model(tmp_path / 'model')
  (tmp_path / 'slides').mkdir()
  for k, stem in enumerate(STEMS):
    slide_files.write_tiff(tmp_path / 'slides' / f'{stem}.tif', slide_files.mosaic(1, 1, first=k)[0],
                           0.25)
  env = dict(os.environ, PYTHONPATH=str(REPO), XLA_FLAGS=xla_flags(1), JAX_PLATFORMS='cpu')
  one = subprocess.run(_command(tmp_path / 'model', tmp_path / 'slides', tmp_path / 'one'),
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=HANG_TIMEOUT)
  assert one.returncode == 0, one.stderr[-3000:]
  port = free_port()
  procs = [subprocess.Popen(
      _command(tmp_path / 'model', tmp_path / 'slides', tmp_path / 'two', '--distributed',
               f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}'),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO) for i in range(2)]
  logs = [p.communicate(timeout=HANG_TIMEOUT)[1] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], [log[-2000:] for log in logs]
  # Each slide predicted by exactly one process (its summary line), claimed once.
  done = {stem: sum(len(re.findall(rf'{stem}\.tif: \d+ nuclei, ', log)) for log in logs)
          for stem in STEMS}
  assert done == {stem: 1 for stem in STEMS}, done
  claims = list((tmp_path / 'two' / '.claims').glob('*/*'))
  assert sorted(p.name for p in claims) == list(STEMS)
  for stem in STEMS:
    for name in OUTPUTS:
      assert ((tmp_path / 'two' / stem / name).read_bytes()
              == (tmp_path / 'one' / stem / name).read_bytes()), (stem, name)
    a, b = (json.loads((tmp_path / d / stem / 'summary.json').read_text()) for d in ('one', 'two'))
    del a['seconds'], b['seconds']
    assert a == b
