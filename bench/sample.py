"""Benchmark: DiffMix synthesis throughput (patches/s) of the sample stage's render function.

  python bench/sample.py --config configs/consep.py --batch 8 --calls 3   # full model, on a GPU
  python bench/sample.py --config configs/tiny.py --batch 2 --calls 3    # CPU smoke figure

Renders `--batch` patches per device per call (conditional and unconditional passes batched, bf16 when
the config says so, sharded over all devices) with random weights of the configured model and the
configured respacing, percent and guidance (ddim100, 55 %, s = 1.5 for CoNSeP: 55 steps x 2 passes).
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


def render_setup(config, mesh, n: int):
  """The sample stage's render function, random replicated params and a sharded batch of n patches.

  Returns:
    (render, params, batch) with batch `x0` float32 [n, S, S, 3], `y` float32 [n, S, S, C], `index`
    int32 [n], sharded over the mesh; call `render(params, batch['x0'], batch['y'], batch['index'])`.
  """
  from diffmix_jax.sdm import render as sdm_render  # pylint: disable=g-import-not-at-top
  from diffmix_jax.core import sharding  # pylint: disable=g-import-not-at-top
  from diffmix_jax.sdm import unet as sdm_unet  # pylint: disable=g-import-not-at-top
  module = sdm_unet.create_sdm(**config.diffusion.model)
  params = jax.device_put(sdm_unet.init_params(module, jax.random.key(0)),
                          sharding.replicated(mesh))
  render = sdm_render.render_fn(config, module, mesh)
  rng = np.random.default_rng(0)
  s, cy = config.sample.patch_size, module.label_channels
  batch = sharding.global_batch({
      'x0': rng.uniform(-1, 1, (n, s, s, 3)).astype(np.float32),
      'y': (rng.random((n, s, s, cy)) < 0.3).astype(np.float32),
      'index': np.arange(n, dtype=np.int32)}, mesh)
  return render, params, batch


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/tiny.py')
  parser.add_argument('--batch', type=int, default=2, help='patches per device per call')
  parser.add_argument('--calls', type=int, default=3)
  args = parser.parse_args()
  from diffmix_jax.core import sharding  # pylint: disable=g-import-not-at-top
  config = _load_config(args.config)
  mesh = sharding.create_mesh(config.mesh)
  n = args.batch * mesh.shape[sharding.DATA]
  render, params, batch = render_setup(config, mesh, n)
  jax.block_until_ready(render(params, batch['x0'], batch['y'], batch['index']))  # Compile.
  start = time.perf_counter()
  for _ in range(args.calls):
    out = render(params, batch['x0'], batch['y'], batch['index'])
  jax.block_until_ready(out)
  dt = (time.perf_counter() - start) / args.calls
  devices = jax.devices()
  sc = config.sample
  print(f'# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {len(devices)} x '
        f'{devices[0].device_kind}, config {args.config} ({sc.timestep_respacing}, {sc.percent} %, '
        f's={sc.guidance}, {config.diffusion.model.dtype}), {n} patches per call')
  print(f'{dt:.3f} s per call, {n / dt:.3f} patches/s')


if __name__ == '__main__':
  main()
