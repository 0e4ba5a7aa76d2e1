"""SDM UNet cost: XLA FLOPs of forward / forward+backward at the full config, and img/s at a small one.

  python bench/sdm_forward.py                       # both parts
  python bench/sdm_forward.py --part=flops --dtype=bfloat16
  python bench/sdm_forward.py --part=speed --speed_size=64 --speed_channels=64 --speed_batch=4

Reference (docs/sdm.md §0): forward 3.4226e12 FLOPs per 256² image (PyTorch FlopCounter, convs + matmuls only),
forward+backward ≈ 1.027e13. XLA also counts element-wise ops, so a few % above is expected.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import common  # noqa: E402
from diffmix_jax.sdm import diffusion as gd  # noqa: E402
from diffmix_jax.sdm import unet as sdm_unet  # noqa: E402

_PART = flags.DEFINE_enum('part', 'all', ['all', 'flops', 'speed'], 'What to measure.')
_DTYPE = flags.DEFINE_string('dtype', 'float32', 'Compute dtype for the FLOP count.')
_SIZE = flags.DEFINE_integer('speed_size', 64, 'image_size of the throughput model.')
_CHANNELS = flags.DEFINE_integer('speed_channels', 64, 'num_channels of the throughput model.')
_BATCH = flags.DEFINE_integer('speed_batch', 4, 'Batch of the throughput measurement.')
_ITERS = flags.DEFINE_integer('speed_iters', 5, 'Timed iterations.')

FWD_REF, TRAIN_REF = 3.4226e12, 1.027e13


def _flops(fn, *args) -> float:
  t0 = time.time()
  compiled = jax.jit(fn).lower(*args).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  print(f'  (compiled in {time.time() - t0:.0f} s)', flush=True)
  return float(cost['flops'])


def _inputs(module, batch):
  s, cy = module.image_size, module.label_channels
  return (jax.ShapeDtypeStruct((batch, s, s, 3), jnp.float32),
          jax.ShapeDtypeStruct((batch,), jnp.int32),
          jax.ShapeDtypeStruct((batch, s, s, cy), jnp.float32))


def _loss_fn(module, diff):
  def loss(params, x0, t, y):
    fn = lambda x_t, tt, yy: module.apply({'params': params}, x_t, tt, yy)
    return jnp.mean(gd.training_losses(diff, fn, x0, t, y, x0)['loss'])
  return loss


def measure_flops(dtype: str) -> None:
  """Forward and forward+backward FLOPs of the full CoNSeP config at batch 1, 256²."""
  diff = gd.create_diffusion()
  for remat in (False, True):
    cfg = common.base_config().diffusion.model
    cfg.dtype, cfg.remat = dtype, remat
    module = sdm_unet.create_sdm(**cfg)
    params = sdm_unet.abstract_params(module)
    args = _inputs(module, 1)
    if not remat:
      fwd = _flops(lambda p, x, t, y: module.apply({'params': p}, x, t, y), params, *args)
      print(f'forward FLOPs/img ({dtype}): {fwd:.4e}  (docs/sdm.md {FWD_REF:.4e}, '
            f'{100 * (fwd / FWD_REF - 1):+.2f} %)', flush=True)
    train = _flops(jax.grad(_loss_fn(module, diff)), params, *args)
    print(f'fwd+bwd FLOPs/img ({dtype}, remat={remat}): {train:.4e}  (docs/sdm.md {TRAIN_REF:.4e}, '
          f'{100 * (train / TRAIN_REF - 1):+.2f} %)', flush=True)


def measure_speed(size: int, channels: int, batch: int, iters: int) -> None:
  """Forward and train-gradient img/s of a small config on the local device."""
  cfg = common.base_config().diffusion.model
  cfg.update(image_size=size, num_channels=channels, channel_mult='1,2,2',
             attention_resolutions=str(size // 4), dtype='float32', remat=False)
  module = sdm_unet.create_sdm(**cfg)
  params = sdm_unet.init_params(module, jax.random.key(0), 1)
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  rng = np.random.default_rng(0)
  x = rng.standard_normal((batch, size, size, 3)).astype(np.float32)
  y = rng.integers(0, 2, (batch, size, size, module.label_channels)).astype(np.float32)
  t = rng.integers(0, 1000, batch).astype(np.int32)
  fwd = jax.jit(lambda p, x, t, y: module.apply({'params': p}, x, t, y))
  grad = jax.jit(jax.grad(_loss_fn(module, gd.create_diffusion())))
  print(f'speed model: image_size={size} num_channels={channels} channel_mult=1,2,2 '
        f'attention={size // 4} params={n:,} batch={batch} device={jax.devices()[0].device_kind}')
  for name, f in (('forward', fwd), ('forward+backward', grad)):
    jax.block_until_ready(f(params, x, t, y))
    t0 = time.perf_counter()
    for _ in range(iters):
      jax.block_until_ready(f(params, x, t, y))
    dt = (time.perf_counter() - t0) / iters
    print(f'{name}: {batch / dt:.2f} img/s ({1e3 * dt:.0f} ms per batch of {batch})', flush=True)


def main(argv):
  del argv
  print(f'jax {jax.__version__}, devices {jax.devices()}')
  if _PART.value in ('all', 'flops'):
    measure_flops(_DTYPE.value)
  if _PART.value in ('all', 'speed'):
    measure_speed(_SIZE.value, _CHANNELS.value, _BATCH.value, _ITERS.value)


if __name__ == '__main__':
  app.run(main)
