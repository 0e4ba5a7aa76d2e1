"""Tests of the synthesis stage: exactly-once shards after a kill, exports, read-back, determinism."""

import pathlib
import signal
import subprocess
import sys
import time

import numpy as np

from configs import tiny
from conftest import copy_workdir
from diffmix_jax import evaluate
from diffmix_jax import input_pipeline
from diffmix_jax import label_mixing
from diffmix_jax import mix_labels
from diffmix_jax import sample
from diffmix_jax import synthetic_io

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _all_shards(workdir):
  shards = sorted((workdir / 'synthetic' / 'shards').glob('shard_*.npz'))
  return [synthetic_io.read_shard(workdir, k) for k in range(len(shards))]


def test_kill_mid_stage_then_rerun_renders_every_patch_exactly_once(tiny_trained, sampled,
                                                                    tmp_path):
  reference = sampled
  killed = copy_workdir(tiny_trained, tmp_path / 'killed', skip=('synthetic',))
  cmd = [sys.executable, '-m', 'diffmix_jax.main', '--config', 'configs/tiny.py', '--workdir',
         str(killed), '--config.stages=sample']
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  marker = synthetic_io.shard_path(killed, 2)
  deadline = time.time() + 300
  while not marker.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  assert proc.poll() is None, 'the stage finished before it could be killed'
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (killed / 'synthetic' / 'DONE').exists()
  done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]

  config = tiny.get_config()
  tiles = {t['name']: t for t in input_pipeline.load_split(config, str(killed), 'train')}
  items = sample.work_items(config, str(killed), tiles)
  got, want = _all_shards(killed), _all_shards(reference)
  index = np.concatenate([s['index'] for s in got])
  np.testing.assert_array_equal(index, np.arange(len(items)))  # Each patch once, none missing.
  assert len(items) == 32 * 4 * 2  # 32 tiles x 4 grid patches x 2 kinds.
  for a, b in zip(got, want):  # Same seed, same images, however the run was interrupted.
    for key in synthetic_io.SHARD_KEYS:
      np.testing.assert_array_equal(a[key], b[key])
  # A rerun of the finished stage is a no-op.
  again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0 and 'sample: already done' in again.stderr


def test_exports_pass_evaluate_checks_and_agree_with_mixed_labels(sampled):
  workdir, config = sampled, tiny.get_config()
  labels_dir = workdir / 'synthetic' / 'consep_format' / 'Labels'
  files = sorted(labels_dir.glob('*.mat'))
  assert len(files) == 256 and len(list((labels_dir.parent / 'Images').glob('*.png'))) == 256
  size = config.sample.patch_size
  for path in files[::17]:
    record = evaluate.load_mat(path)  # Raises on any input-check failure.
    tile, kind, patch = path.stem.rsplit('_', 2)
    mixed = mix_labels.load_mixed(workdir, kind, tile)
    if kind == 'balance':
      offsets = label_mixing.grid_offsets(256, 256, size, config.sample.grid_stride)
      r, c = (int(v) for v in offsets[int(patch)])
      inst = mixed['inst_map'][r:r + size, c:c + size]
      types = mixed['type_map'][r:r + size, c:c + size]
    else:
      inst, types = mixed['inst_maps'][int(patch)], mixed['type_maps'][int(patch)]
    # Class of each instance, in order of its original id (the export renumbers ids 1..N).
    ids = np.unique(inst[inst > 0])
    want = [int(types[inst == i][0]) for i in ids]
    np.testing.assert_array_equal(np.asarray(record['inst_type']).ravel(), want)
  preview = workdir / 'synthetic' / 'preview.png'
  assert preview.exists() and preview.stat().st_size > 0


def test_synthetic_set_reads_back_like_real_tiles(sampled):
  workdir, config = sampled, tiny.get_config()
  synth = synthetic_io.open_source(workdir)
  real = input_pipeline.source_for(config, str(workdir), 'train')
  assert len(synth) == 256
  s, r = synth[0], real[0]
  for key in ('image', 'inst_map', 'type_map'):
    assert s[key].dtype == r[key].dtype and s[key].ndim == r[key].ndim
  assert s['image'].shape == (32, 32, 3)
  assert s['source_tile'] in (b'train_1', 'train_1') and s['kind'] in (b'balance', 'balance')
  batch = input_pipeline.train_dataset(synth, crop_size=32, global_batch=4, seed=0)[0]
  real_batch = input_pipeline.train_dataset(real, crop_size=32, global_batch=4, seed=0)[0]
  for key in batch:
    assert batch[key].shape == real_batch[key].shape and batch[key].dtype == real_batch[key].dtype
