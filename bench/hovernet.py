"""HoVer-Net cost: XLA FLOPs per patch, train img/s in both phases and tile-inference time.

  python bench/hovernet.py                                   # full fast-mode model, batch 2
  python bench/hovernet.py --mode=original --batch=1 --tile=256
  python bench/hovernet.py --nosplit_grouped_convs          # one grouped op per dense unit
  python bench/hovernet.py --width=16 --encoder_units=1,1,1,1 --iters=5   # the demo's network

Uses the full-size network (width 1, official units). Training runs the real jitted `train_step`
(phase 1 = frozen encoder gradient path, phase 2 = all trainable) on one device. Tile inference
runs `hovernet_infer` on a `--tile`-side tile (patches + stitching + post-processing once), and
the per-1000^2 figure is extrapolated from the per-patch time (49 fast / 169 original patches) plus
post-processing measured on a 1000^2 map. Reference FLOPs: docs/hovernet.md §0.
"""

import os
import pathlib
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from scipy import io as sio  # noqa: E402

from configs import common  # noqa: E402
from diffmix_jax.hovernet import infer as hovernet_infer  # noqa: E402
from diffmix_jax.hovernet import targets as hovernet_targets  # noqa: E402
from diffmix_jax.hovernet import training as hovernet_training  # noqa: E402
from diffmix_jax.metrics import postprocess  # noqa: E402
from diffmix_jax.core import sharding  # noqa: E402

_MODE = flags.DEFINE_enum('mode', 'fast', ['fast', 'original'], 'HoVer-Net mode.')
_BATCH = flags.DEFINE_integer('batch', 2, 'Training batch.')
_ITERS = flags.DEFINE_integer('iters', 3, 'Timed training steps per phase.')
_TILE = flags.DEFINE_integer('tile', 256, 'Side of the inferred tile.')
_CONSEP = flags.DEFINE_string('consep_dir', str(pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'consep'),
                              'CoNSeP folder for the post-processing timing (skipped if absent).')
_SPLIT = flags.DEFINE_bool('split_grouped_convs', True,
                           'Grouped convs as per-group convs (False: one grouped op).')
_WIDTH = flags.DEFINE_integer('width', 1, 'Channel divisor (1 = official network, 16 = demo).')
_UNITS = flags.DEFINE_list('encoder_units', ['3', '4', '6', '3'], 'Residual units per encoder group.')
_PART = flags.DEFINE_enum('part', 'all', ['all', 'post'], 'all, or post-processing only.')


def _timed(fn, iters):
  fn()  # Warm-up / compile.
  t0 = time.time()
  for _ in range(iters):
    fn()
  return (time.time() - t0) / iters


def _post_seconds() -> float:
  """Post-processing time of one 1000^2 map: an oracle map of CoNSeP test_1 when available."""
  path = os.path.join(_CONSEP.value, 'Test', 'Labels', 'test_1.mat')
  if os.path.exists(path):
    mat = sio.loadmat(path)
    inst, types = mat['inst_map'].astype(np.int32), mat['type_map'].astype(np.int32)
    where = 'CoNSeP test_1 oracle map'
  else:
    from tfds_builders.demo_nuclei import generate as demo_tiles
    tiles = [demo_tiles.make_tile(0, 'test', i) for i in range(16)]
    inst = np.block([[t[1] + 1000 * (4 * r + c) * (t[1] > 0) for c, t in
                      enumerate(tiles[4 * r:4 * r + 4])] for r in range(4)])[:1000, :1000]
    types = np.block([[t[2] for t in tiles[4 * r:4 * r + 4]] for r in range(4)])[:1000, :1000]
    where = 'demo oracle map'
  hv = hovernet_targets.hv_map(inst, 1000)
  pred = np.concatenate([types[..., None], (inst > 0)[..., None], hv], -1).astype(np.float32)
  sec = _timed(lambda: postprocess.process(pred, 5), 1)
  print(f'post-processing ({where}, {len(np.unique(inst)) - 1} nuclei): {sec:.2f} s')
  return sec


def main(argv):
  del argv
  if _PART.value == 'post':
    _post_seconds()
    return
  c = common.base_config()
  c.mesh.data = 1
  c.hovernet.model.mode = _MODE.value
  c.hovernet.model.split_grouped_convs = _SPLIT.value
  c.hovernet.model.width, c.hovernet.model.encoder_units = _WIDTH.value, tuple(map(int, _UNITS.value))
  mesh = sharding.create_mesh(c.mesh)
  trainer = hovernet_training.create_trainer(c, mesh, (100, 100))
  module = trainer.module
  size, out = module.patch_shapes
  print(f'device: {jax.devices()[0].device_kind} x{len(jax.devices())}, mode {_MODE.value}, '
        f'batch {_BATCH.value}, width {_WIDTH.value}, units {",".join(_UNITS.value)}, '
        f'split_grouped_convs {_SPLIT.value}')
  state = trainer.init(jax.random.key(0))
  rng = np.random.default_rng(0)
  inst = np.zeros((size, size), np.int32)
  inst[40:60, 40:60], inst[100:130, 90:120] = 1, 2
  tgt = hovernet_targets.targets(inst, (inst > 0).astype(np.int32), out)
  batch = {'image': rng.integers(0, 256, (_BATCH.value, size, size, 3), dtype=np.uint8),
           **{k: np.stack([v] * _BATCH.value) for k, v in tgt.items()}}
  gb = sharding.global_batch(batch, mesh)
  for phase in (0, 1):
    lr = trainer.lr(phase, 0)
    flops = trainer.steps[phase].lower(state, gb, lr).compile().cost_analysis()['flops']
    holder = [state]

    def step(p=phase):
      holder[0], m = trainer.steps[p](holder[0], gb, lr)
      jax.block_until_ready(m)

    sec = _timed(step, _ITERS.value)
    state = holder[0]
    print(f'train phase {phase + 1}: {_BATCH.value / sec:.3f} img/s ({sec:.2f} s/step), '
          f'XLA {flops / _BATCH.value / 1e9:.1f} GFLOP per patch')
  variables = jax.device_get({'params': state.params, 'batch_stats': state.batch_stats})
  one_device = jax.sharding.Mesh(np.asarray(jax.local_devices()[:1]), (sharding.DATA,))
  predict = hovernet_infer.create_predictor(module, variables, 1, one_device)
  tile = rng.integers(0, 256, (_TILE.value, _TILE.value, 3), dtype=np.uint8)
  n_patches = len(hovernet_infer.tile_patches(tile, size, out))
  sec_tile = _timed(lambda: hovernet_infer.predict_record(predict, module, tile), 1)
  patch = hovernet_infer.tile_patches(tile, size, out)[:1]
  sec_patch = _timed(lambda: predict(patch), 2)
  sec_post = _post_seconds()
  n1000 = hovernet_targets.tile_geometry(1000, size, out)['n'] ** 2
  print(f'tile inference {_TILE.value}^2 ({n_patches} patches, incl. post-processing): '
        f'{sec_tile:.2f} s; per patch {sec_patch:.2f} s; post-processing of a 1000^2 map '
        f'{sec_post:.2f} s; per 1000^2 tile (extrapolated, {n1000} patches) '
        f'{n1000 * sec_patch + sec_post:.1f} s')


if __name__ == '__main__':
  app.run(main)
