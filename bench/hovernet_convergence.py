"""HoVer-Net convergence on the demo set: instance metrics against training steps.

  python bench/hovernet_convergence.py --head_init=zeros --lr=1e-2 --steps=150 --every=25
  python bench/hovernet_convergence.py --head_init=zeros --train_tiles=32 --window_step=256 \
      --eval_split=test --steps=400 --every=50

Trains the stage's own phase-2 step (all trainable, fresh Adam) on windows of demo train tiles and,
every `--every` steps, runs tiled inference + the official post-processing + `evaluate` on the first
training tile (overfitting) or on test tiles (generalisation). The training loop is the stage's
data path (PatchSet, create_dataset, jitted train step) without checkpoints or TensorBoard. The
training seconds exclude the evaluations and include the first step's compilation.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402

from configs import tiny  # noqa: E402
from tfds_builders.demo_nuclei import generate as demo_tiles
from diffmix_jax.metrics import records  # noqa: E402
from diffmix_jax.hovernet import patches as hovernet_data  # noqa: E402
from diffmix_jax.hovernet import infer as hovernet_infer  # noqa: E402
from diffmix_jax.hovernet import training as hovernet_training  # noqa: E402
from diffmix_jax.core import sharding  # noqa: E402

_HEAD = flags.DEFINE_enum('head_init', 'zeros', ['kaiming', 'zeros'], 'Output conv init.')
_LR = flags.DEFINE_float('lr', 1e-2, 'Adam learning rate.')
_DECAY = flags.DEFINE_integer('decay_epochs', 10**6, 'Epochs before the lr drops by 10x.')
_MSE = flags.DEFINE_float('mse_weight', 1.0, 'Weight of the HV MSE term.')
_STEPS = flags.DEFINE_integer('steps', 150, 'Training steps.')
_EVERY = flags.DEFINE_integer('every', 25, 'Evaluate every N steps.')
_BATCH = flags.DEFINE_integer('batch', 2, 'Global batch.')
_WIDTH = flags.DEFINE_integer('width', 16, 'HoVer-Net channel divisor.')
_UNITS = flags.DEFINE_list('encoder_units', ['1', '1', '1', '1'], 'Residual units per encoder group.')
_TILES = flags.DEFINE_integer('train_tiles', 1, 'Demo train tiles to train on.')
_WINDOW_STEP = flags.DEFINE_integer('window_step', 164, 'Window stride (164: 4 per tile).')
_EVAL = flags.DEFINE_enum('eval_split', 'train', ['train', 'test'],
                          'train: the first training tile; test: the first --eval_tiles test tiles.')
_EVAL_TILES = flags.DEFINE_integer('eval_tiles', 2, 'Test tiles evaluated with --eval_split=test.')
_SEED = flags.DEFINE_integer('seed', 0, 'Init seed.')


def _tile(split: str, i: int) -> dict:
  image, inst, types = demo_tiles.make_tile(demo_tiles.SEED, split, i)
  return {'image': image, 'inst_map': inst, 'type_map': types}


def main(argv):
  del argv
  c = tiny.get_config()
  c.mesh.data = 1
  m, h = c.hovernet.model, c.hovernet.train
  m.width, m.encoder_units, m.head_init = _WIDTH.value, tuple(map(int, _UNITS.value)), _HEAD.value
  h.lr, h.lr_step_epochs, h.mse_weight = _LR.value, _DECAY.value, _MSE.value
  mesh = sharding.create_mesh(c.mesh)
  tiles = [_tile('train', i) for i in range(_TILES.value)]
  eval_tiles = (tiles[:1] if _EVAL.value == 'train'
                else [_tile('test', i) for i in range(_EVAL_TILES.value)])
  patches = hovernet_data.PatchSet(tiles, [], h.patch_window, _WINDOW_STEP.value, 0)
  per_epoch = len(patches) // _BATCH.value
  trainer = hovernet_training.create_trainer(c, mesh, (per_epoch, per_epoch))
  size, out = trainer.module.patch_shapes
  state = trainer.init(jax.random.key(_SEED.value))
  it = hovernet_data.create_dataset(patches, phase_seed=1, global_batch=_BATCH.value, start=0,
                                     total=_STEPS.value, input_size=size, output_size=out,
                                     augment=False, num_threads=2)
  print(f'device {jax.devices()[0].device_kind}; {len(patches)} windows, batch {_BATCH.value}, '
        f'head_init {_HEAD.value}, lr {_LR.value}, seed {_SEED.value}; evaluating '
        f'{len(eval_tiles)} {_EVAL.value} tile(s)', flush=True)
  train_seconds = 0.0
  for step in range(1, _STEPS.value + 1):
    t0 = time.time()
    state, metrics = trainer.steps[1](state, sharding.global_batch(next(it), mesh),
                                      trainer.lr(1, step - 1))
    jax.block_until_ready(metrics)
    train_seconds += time.time() - t0
    if step % _EVERY.value:
      continue
    variables = jax.device_get({'params': state.params, 'batch_stats': state.batch_stats})
    predict = hovernet_infer.create_predictor(trainer.module, variables, 4)
    pairs = [(records.label_record(t['inst_map'], t['type_map']),
              hovernet_infer.predict_record(predict, trainer.module, t['image']))
             for t in eval_tiles]
    r = records.evaluate_arrays(pairs)
    loss = {k: float(v) for k, v in jax.device_get(metrics).items()}
    print(f'step {step:4d} ({train_seconds:6.1f} s training): dice {r["dice"]:.3f} '
          f'aji {r["aji"]:.3f} pq {r["pq"]:.3f} f_d {r["f_d"]:.3f} nuclei {r["num_pred"]}/'
          f'{r["num_true"]} | loss {loss["loss"]:.3f} hv_mse {loss["hv_mse"]:.4f} '
          f'hv_msge {loss["hv_msge"]:.3f}', flush=True)


if __name__ == '__main__':
  app.run(main)
