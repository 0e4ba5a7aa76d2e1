"""`python -m diffmix_jax.predict --slides` end to end: a kill -9 mid-slide then a rerun equals an
uninterrupted run, a finished slide is skipped, and bad input among good is
named with the exit status 1. The tiny random-weight HoVer-Net of tests/predict_test.py
on a 2x2 mosaic of demo test tiles (512 px: 2 x 2 chunks of 2 blocks)."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import HANG_TIMEOUT
from conftest import xla_flags
from diffmix_jax import predict
from diffmix_jax.slides import pipeline
from diffmix_jax.slides import runner
import slide_files

REPO = pathlib.Path(__file__).resolve().parents[2]
OUTPUTS = ('nuclei.geojson', 'nuclei.json', 'nuclei.parquet', 'thumbnail.png', 'tissue_mask.png')


def _command(model, slides, out, *extra):
  return [sys.executable, '-m', 'diffmix_jax.predict', f'--model_dir={model}', f'--out={out}',
          '--chunk=2', '--workers=1', '--batch_size=4', *extra, '--slides', *map(str, slides)]


def _env():
  return dict(os.environ, PYTHONPATH=str(REPO), XLA_FLAGS=xla_flags(1), JAX_PLATFORMS='cpu')


def _run(*args):
  return subprocess.run(_command(*args), capture_output=True, text=True, env=_env(), cwd=REPO,
                        timeout=HANG_TIMEOUT)


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp('slides')
  slide_files.write_model(root / 'model')
  slide_files.write_svs(root / 'mosaic.svs', slide_files.mosaic(2, 2)[0], 0.25)
  return root


def _content(folder: pathlib.Path) -> dict:
  out = {name: (folder / name).read_bytes() for name in OUTPUTS}
  summary = json.loads((folder / 'summary.json').read_text())
  del summary['seconds']  # Durations differ from run to run; everything else must not.
  return dict(out, summary=summary)


def _children(pid: int) -> list[int]:
  """The ids of the live child processes of `pid` (Linux /proc)."""
  out = subprocess.run(['ps', '--ppid', str(pid), '-o', 'pid='], capture_output=True, text=True)
  return [int(x) for x in out.stdout.split()]


def _alive(pid: int) -> bool:
  """True while `pid` exists and is not a zombie."""
  try:
    return pathlib.Path(f'/proc/{pid}/stat').read_text().split(') ')[1][0] != 'Z'
  except (FileNotFoundError, IndexError):
    return False


@pytest.mark.slow
def test_killed_slide_resumes_to_the_uninterrupted_outputs(files):
  import openslide  # pylint: disable=g-import-not-at-top
  assert openslide.OpenSlide.detect_format(str(files / 'mosaic.svs')) == 'aperio'
  done = _run(files / 'model', [files / 'mosaic.svs'], files / 'whole')
  assert done.returncode == 0, done.stderr[-3000:]
  want = _content(files / 'whole' / 'mosaic')
  proc = subprocess.Popen(_command(files / 'model', [files / 'mosaic.svs'], files / 'killed'),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(), cwd=REPO)
  parts = files / 'killed' / 'mosaic' / '.parts'
  deadline = time.monotonic() + HANG_TIMEOUT
  while not list(parts.glob('*_*.npz')) and proc.poll() is None and time.monotonic() < deadline:
    time.sleep(0.05)
  children = _children(proc.pid)  # The post-processing pool and its resource tracker.
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  while any(map(_alive, children)) and time.monotonic() < deadline:
    time.sleep(0.1)
  assert children and not any(map(_alive, children)), children  # No orphans left behind.
  finished = sorted(p.name for p in parts.glob('*_*.npz'))
  assert 1 <= len(finished) < 4, finished  # Killed mid-slide: some of the 4 chunks done.
  assert not (files / 'killed' / 'mosaic' / 'fingerprint.txt').exists()
  again = _run(files / 'model', [files / 'mosaic.svs'], files / 'killed')
  assert again.returncode == 0, again.stderr[-3000:]
  got = _content(files / 'killed' / 'mosaic')
  assert got == want
  table = pq.read_table(files / 'whole' / 'mosaic' / 'nuclei.parquet')
  geo = json.loads(want['nuclei.geojson'])
  assert table.num_rows == len(geo['features']) == want['summary']['nuclei'] >= 5  # Measured: 9.
  assert table.column('id').to_pylist() == [f['id'] for f in geo['features']]
  assert want['summary']['mpp'] == 0.25 and want['summary']['level'] == 0
  # A finished slide is skipped: nothing is rewritten (in this process, with the options the flags
  # above give: the same run key, and no network is built).
  stamp = {p: p.stat().st_mtime_ns for p in (files / 'killed').rglob('*') if p.is_file()}
  model = predict.load_model(model_dir=str(files / 'model'))
  opts = pipeline.Options(chunk=2, workers=1)
  assert runner.predict_slides(model, [str(files / 'mosaic.svs')], str(files / 'killed'),
                               predict.class_table(5), 0.25, opts, 4) == []
  assert stamp == {p: p.stat().st_mtime_ns for p in (files / 'killed').rglob('*') if p.is_file()}


@pytest.mark.slow
def test_bad_slides_are_named_and_the_rest_predicted(files, tmp_path):
  image = slide_files.mosaic(1, 1)[0]
  slide_files.write_tiff(tmp_path / 'no_mpp.tif', image, None)
  slide_files.write_tiff(tmp_path / 'blank.tif', np.full((600, 700, 3), 245, np.uint8), 0.25)
  slide_files.write_tiff(tmp_path / 'small.tif', image[:100, :120], 0.25, downsamples=(1,))
  good = (files / 'mosaic.svs').read_bytes()
  (tmp_path / 'truncated.svs').write_bytes(good[:len(good) // 2])
  (tmp_path / 'notes.txt').write_text('not a slide suffix: ignored')
  done = _run(files / 'model', [tmp_path], tmp_path / 'out')
  assert done.returncode == 1, done.stderr[-3000:]
  assert f'{tmp_path / "no_mpp.tif"}: the slide states no µm/px' in done.stderr
  assert '--mpp' in done.stderr and 'truncated.svs' in done.stderr
  assert 'blank.tif: 0 nuclei' in done.stderr and 'no tissue found' in done.stderr
  blank = json.loads((tmp_path / 'out' / 'blank' / 'summary.json').read_text())
  assert blank['nuclei'] == 0 and blank['windows'] == 0
  assert json.loads((tmp_path / 'out' / 'blank' / 'nuclei.geojson').read_text())['features'] == []
  small = json.loads((tmp_path / 'out' / 'small' / 'summary.json').read_text())
  assert small['work_size'] == [120, 100] and small['windows'] == 1
  assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['blank', 'small']


def test_slide_list_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='no such slide file or folder'):
    runner.list_slides([str(tmp_path / 'none.svs')])
  with pytest.raises(FileNotFoundError, match='no slide'):
    runner.list_slides([str(tmp_path)])
  (tmp_path / 'a.svs').write_bytes(b'')
  (tmp_path / 'a.tif').write_bytes(b'')
  with pytest.raises(ValueError, match="share the name 'a'"):
    runner.list_slides([str(tmp_path)])
