"""Tests of the SDM training stage: device-count invariance, label dropping, TensorBoard.

The SIGKILL-and-resume check (bit-identical EMA and params) is part of main_test.py's chain test.
"""

import pathlib

from flax import linen as nn
import jax
import numpy as np
import pytest

from configs import tiny
from diffmix_jax.sdm import training as sdm_training
from diffmix_jax.core import sharding
from diffmix_jax.core import loop as loop_lib
from diffmix_jax.sdm import unet as sdm_unet

ROOT = pathlib.Path(__file__).resolve().parents[2]
# configs/tiny.py trains 8 + 4 steps, checkpoints every 4, logs every step, samples every 6.


def _config(**overrides):
  c = tiny.get_config()
  for key, value in overrides.items():
    node = c
    *path, leaf = key.split('.')
    for part in path:
      node = node[part]
    node[leaf] = value
  return c


def _batches(config, n, seed=0):
  rng = np.random.default_rng(seed)
  s, b = config.data.crop_size, config.diffusion.train.batch_size
  out = []
  for _ in range(n):
    inst = rng.integers(0, 4, (b, s, s)).astype(np.int32)
    local = {'image': rng.uniform(-1, 1, (b, s, s, 3)).astype(np.float32), 'inst_map': inst,
             'type_map': (inst % config.data.num_classes).astype(np.int32)}
    out.append({'image': local['image'],
                'y': sdm_training.make_condition(local, config.diffusion.model)})
  return out


def _train(config, devices, batches):
  config.mesh.data = devices
  mesh = sharding.create_mesh(config.mesh)
  trainer = sdm_training.create_trainer(config, mesh)
  state = trainer.init(jax.random.key(config.seed))
  losses = []
  for local in batches:
    state, metrics = trainer.step(state, sharding.global_batch(local, mesh))
    losses.append(float(metrics['loss']))
  return losses, jax.device_get(state.params), jax.device_get(state.ema)


# A 16x16 model keeps the in-process tests cheap.
SMALL = {'data.crop_size': 16, 'diffusion.model.image_size': 16,
         'diffusion.model.channel_mult': '1', 'diffusion.model.attention_resolutions': '16'}


@pytest.mark.slow
def test_one_and_eight_devices_give_the_same_losses_and_params():
  batches = _batches(_config(**SMALL), 5)
  l1, p1, e1 = _train(_config(**SMALL), 1, batches)
  l8, p8, e8 = _train(_config(**SMALL), 8, batches)
  np.testing.assert_allclose(l1, l8, atol=1e-5, rtol=0)
  assert l1[0] != l1[-1]  # The steps really trained.
  for a, b in zip(jax.tree.leaves(p1) + jax.tree.leaves(e1), jax.tree.leaves(p8) +
                  jax.tree.leaves(e8)):
    np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-5)


@pytest.mark.slow
def test_label_drop_rates_through_the_step_function():
  # Step 0 is phase 1 with drop rate 1.0; the next 10 steps are phase 2 with drop rate 0.2.
  # The rate is a property of the step, not of the model: 8-px crops keep 11 steps of 104 samples
  # cheap (at 16 px they take ~20 s).
  c = _config(**{**SMALL, 'data.crop_size': 8, 'diffusion.model.image_size': 8,
                 'diffusion.model.attention_resolutions': '8', 'diffusion.train.batch_size': 104,
                 'diffusion.train.phase1_steps': 1, 'diffusion.train.phase1_drop_rate': 1.0,
                 'diffusion.train.phase2_drop_rate': 0.2})
  mesh = sharding.create_mesh(c.mesh)
  trainer = sdm_training.create_trainer(c, mesh)
  state = trainer.init(jax.random.key(0))
  batch = sharding.global_batch(_batches(c, 1)[0], mesh)
  state, metrics = trainer.step(state, batch)
  assert float(metrics['conditioned_fraction']) == 0.0  # Only all-zero conditions reached the model.
  kept = []
  for _ in range(10):  # 10 x 104 = 1,040 samples, each dropped with probability 0.2.
    state, metrics = trainer.step(state, batch)
    kept.append(float(metrics['conditioned_fraction']))
  assert abs((1 - np.mean(kept)) - 0.2) <= 0.04


@pytest.fixture(scope='module')
def reference_run(tiny_trained):
  """An uninterrupted in-process run of the stage on the demo data (shared with other tests)."""
  return tiny_trained


def _read_events(logdir):
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={'tensors': 0, 'images': 0,
                                                                       'scalars': 0})
  acc.Reload()
  return acc


@pytest.mark.slow
def test_tensorboard_holds_scalars_and_sample_grids(reference_run):
  acc = _read_events(reference_run / 'diffusion' / 'tb')
  tags = acc.Tags()
  names = set(tags['tensors']) | set(tags['scalars'])
  for tag in ('loss', 'mse', 'vb', 'grad_norm', 'lr', 'steps_per_sec', 'images_per_sec'):
    assert tag in names, (tag, tags)
  tc = tiny.get_config().diffusion.train  # Phase 2 starts at step phase1_steps + 1.
  total = tc.phase1_steps + tc.phase2_steps
  losses = [float(jax.numpy.asarray(tf_tensor_value(e))) for e in acc.Tensors('loss')]
  assert len(losses) == total and all(np.isfinite(losses))
  images = acc.Tensors('label_real_ema_sample')
  assert [e.step for e in images] == list(range(tc.sample_every_steps, total + 1,
                                                tc.sample_every_steps))
  assert len(images) >= 2
  lr = {e.step: float(tf_tensor_value(e)) for e in acc.Tensors('lr')}
  assert lr[tc.phase1_steps] == pytest.approx(tc.phase1_lr)
  assert lr[tc.phase1_steps + 1] == pytest.approx(tc.phase2_lr) and tc.phase1_lr != tc.phase2_lr


def tf_tensor_value(event):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.make_ndarray(event.tensor_proto)


def test_jit_init_gives_the_initialisers_values():
  """loop_lib.jit_init (optimisation level 0 on CPU) draws the same parameters as a plain jit."""
  fan_out = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(8, (3, 3), kernel_init=fan_out)(x)
      return nn.Dense(4, kernel_init=nn.initializers.truncated_normal(0.02))(nn.relu(x))

  init = lambda rng: Net().init(rng, jax.numpy.zeros((1, 8, 8, 3)))
  ours = jax.device_get(loop_lib.jit_init(init)(jax.random.key(3)))
  ref = jax.device_get(jax.jit(init)(jax.random.key(3)))
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert np.std(ours['params']['Conv_0']['kernel']) > 0.1  # Really drawn (fan_out 72: std 0.17).


@pytest.mark.slow
def test_dropout_is_applied_in_training_only():
  """diffusion.model.dropout > 0: the training forward depends on the dropout rng, the eval forward
  does not, and training from the same state moves away from dropout 0's (only from the second step:
  the official init zeroes every convolution after a dropout and the output conv)."""
  tiny8 = {**SMALL, 'data.crop_size': 8, 'diffusion.model.image_size': 8,
           'diffusion.model.attention_resolutions': '8'}  # 8 px: compiles in half the time.
  c = _config(**tiny8, **{'diffusion.model.dropout': 0.3})
  module = sdm_unet.create_sdm(**c.diffusion.model)
  rng = np.random.default_rng(0)  # Off the zero-initialised output conv, so the output moves.
  params = jax.tree.map(lambda p: p + rng.normal(0, 0.05, p.shape).astype(p.dtype),
                        jax.device_get(sdm_unet.init_params(module, jax.random.key(0))))
  batch = _batches(c, 1)[0]
  x, y = batch['image'], batch['y']
  t = np.full((x.shape[0],), 500, np.int32)
  fwd = lambda train, k: module.apply({'params': params}, x, t, y, train=train,
                                      rngs={'dropout': jax.random.key(k)})
  assert not np.allclose(fwd(True, 1), fwd(True, 2))
  np.testing.assert_array_equal(fwd(False, 1), fwd(False, 2))
  trained = {}
  for rate in (0.0, 0.3):
    cfg = _config(**tiny8, **{'diffusion.model.dropout': rate})
    cfg.mesh.data = 1
    mesh = sharding.create_mesh(cfg.mesh)
    trainer = sdm_training.create_trainer(cfg, mesh)
    state = trainer.init(jax.random.key(0))
    for _ in range(2):
      state, _ = trainer.step(state, sharding.global_batch(batch, mesh))
    trained[rate] = jax.device_get(state.params)
  differ = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(trained[0.0]),
                                                     jax.tree.leaves(trained[0.3]))]
  assert any(differ)


@pytest.mark.slow
def test_preview_sampler_gets_the_whole_ema_when_it_is_sharded():
  """mesh.shard_opt_state splits each EMA leaf over the 8 devices; the preview grid still samples
  from the whole EMA (it was skipped without a word)."""
  c = _config(**SMALL, **{'mesh.shard_opt_state': True})
  mesh = sharding.create_mesh(c.mesh)
  trainer = sdm_training.create_trainer(c, mesh)
  state = trainer.init(jax.random.key(0))
  sharded = [a for a in jax.tree.leaves(state.ema) if a.addressable_data(0).shape != a.shape]
  assert sharded, 'nothing was sharded: the case is not exercised'
  whole = sdm_training.local_ema(state.ema, True)
  for got, want in zip(jax.tree.leaves(whole), jax.tree.leaves(jax.device_get(state.ema))):
    np.testing.assert_array_equal(np.asarray(got), want)
