"""Benchmark: SDM training throughput (img/s) and MFU, with and without remat.

  python bench/sdm_train.py --config configs/consep.py --batch 16 --steps 20   # full model, on a GPU
  python bench/sdm_train.py --config configs/tiny.py --batch 8 --steps 10     # CPU smoke figure

MFU = (XLA cost-analysis FLOPs of one compiled train step) / step time / device peak FLOP/s.
`--peak_tflops` gives the device peak (H100 SXM dense bf16: 989); without it no MFU is printed.
The step is the stage's own jitted, donated `train_step` on the device mesh, fed with random data.
"""

import argparse
import datetime
import importlib.util
import time

import jax
import numpy as np


def _load_config(path: str):
  spec = importlib.util.spec_from_file_location('bench_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def measure(config, batch: int, steps: int, remat: bool) -> dict:
  from diffmix_jax.sdm import training as sdm_training  # pylint: disable=g-import-not-at-top
  from diffmix_jax.core import sharding  # pylint: disable=g-import-not-at-top
  config.diffusion.train.batch_size = batch
  config.diffusion.model.remat = remat
  mesh = sharding.create_mesh(config.mesh)
  trainer = sdm_training.create_trainer(config, mesh)
  state = trainer.init(jax.random.key(0))
  rng = np.random.default_rng(0)
  s, cy = config.data.crop_size, trainer.module.label_channels
  local = {'image': rng.uniform(-1, 1, (batch, s, s, 3)).astype(np.float32),
           'y': (rng.random((batch, s, s, cy)) < 0.3).astype(np.float32)}
  data = sharding.global_batch(local, mesh)
  start = time.perf_counter()
  compiled = trainer.step.lower(state, data).compile()
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get('flops', 0.0))
  state, metrics = compiled(state, data)  # Warm-up (the compiled step: no second compile).
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, data)
  jax.block_until_ready(metrics)
  dt = (time.perf_counter() - start) / steps
  return {'remat': remat, 'step_s': dt, 'img_per_s': batch / dt, 'flops_per_step': flops,
          'achieved_tflops': flops / dt / 1e12, 'compile_s': compile_s}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/tiny.py')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--peak_tflops', type=float, default=0.0,
                      help='device peak TFLOP/s for MFU (per device, times the device count)')
  args = parser.parse_args()
  devices = jax.devices()
  print(f'# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {len(devices)} x '
        f'{devices[0].device_kind} ({jax.default_backend()}), config {args.config}, '
        f'batch {args.batch}')
  for remat in (False, True):
    r = measure(_load_config(args.config), args.batch, args.steps, remat)
    mfu = ''
    if args.peak_tflops:
      mfu = f', MFU {100 * r["achieved_tflops"] / (args.peak_tflops * len(devices)):.1f} %'
    print(f'remat={remat}: {r["step_s"] * 1e3:.1f} ms/step, {r["img_per_s"]:.2f} img/s, '
          f'{r["flops_per_step"]:.3e} FLOP/step, {r["achieved_tflops"]:.3f} TFLOP/s{mfu}')


if __name__ == '__main__':
  main()
