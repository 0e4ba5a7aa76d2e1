"""Benchmark: data-parallel weak scaling of SDM training and DiffMix sampling on 1-8 devices.

  python bench/scaling.py                          # 8 simulated CPU devices, configs/tiny.py
  python bench/scaling.py --config configs/consep.py --train_batch 2 --sample_batch 8  # 8 GPUs

Weak scaling: every mesh gets the same batch per device (`--train_batch` images per device for the
stage's jitted, donated `train_step`; `--sample_batch` patches per device for the sample stage's
jitted render function), so the global batch grows with the device count. Efficiency of N devices
= img/s(N) / (N * img/s(1)); 100 % is perfect scaling. Without accelerators the devices are
simulated (`--xla_force_host_platform_device_count=8`, set here unless XLA_FLAGS sets a count) and
share the host's cores, so the efficiency is bounded by (cores busy at N) / (N * cores busy at 1):
such figures check that the sharded programs run on every mesh size, not how a GPU host scales.
"""

import argparse
import datetime
import importlib.util
import os
import time

if 'xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=8').strip()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import sample as sample_bench  # pylint: disable=g-import-not-at-top,wrong-import-position  (bench/sample.py)


def _load_config(path: str):
  spec = importlib.util.spec_from_file_location('bench_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _mesh(config, devices: int):
  from diffmix_jax.core import sharding  # pylint: disable=g-import-not-at-top
  config.mesh.data = devices
  return sharding.create_mesh(config.mesh)


def measure_train(config, devices: int, per_device: int, steps: int) -> dict:
  """Seconds per step of the stage's train step on `devices` devices, batch per_device * devices."""
  from diffmix_jax.sdm import training as sdm_training  # pylint: disable=g-import-not-at-top
  from diffmix_jax.core import sharding  # pylint: disable=g-import-not-at-top
  mesh = _mesh(config, devices)
  batch = per_device * devices
  config.diffusion.train.batch_size = batch
  trainer = sdm_training.create_trainer(config, mesh)
  state = trainer.init(jax.random.key(0))
  rng = np.random.default_rng(0)
  s, cy = config.data.crop_size, trainer.module.label_channels
  data = sharding.global_batch({
      'image': rng.uniform(-1, 1, (batch, s, s, 3)).astype(np.float32),
      'y': (rng.random((batch, s, s, cy)) < 0.3).astype(np.float32)}, mesh)
  start = time.perf_counter()
  state, metrics = trainer.step(state, data)  # Compile + warm-up.
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start
  start, cpu = time.perf_counter(), time.process_time()
  for _ in range(steps):
    state, metrics = trainer.step(state, data)
  jax.block_until_ready(metrics)
  dt = (time.perf_counter() - start) / steps
  return {'batch': batch, 'step_s': dt, 'img_per_s': batch / dt, 'compile_s': compile_s,
          'cores': (time.process_time() - cpu) / (dt * steps)}


def measure_sample(config, devices: int, per_device: int, calls: int) -> dict:
  """Seconds per call of the sample stage's render function for per_device * devices patches."""
  mesh = _mesh(config, devices)
  n = per_device * devices
  render, params, batch = sample_bench.render_setup(config, mesh, n)
  start = time.perf_counter()
  jax.block_until_ready(render(params, batch['x0'], batch['y'], batch['index']))  # Compile.
  compile_s = time.perf_counter() - start
  start, cpu = time.perf_counter(), time.process_time()
  for _ in range(calls):
    out = render(params, batch['x0'], batch['y'], batch['index'])
  jax.block_until_ready(out)
  dt = (time.perf_counter() - start) / calls
  return {'batch': n, 'step_s': dt, 'img_per_s': n / dt, 'compile_s': compile_s,
          'cores': (time.process_time() - cpu) / (dt * calls)}


def table(title: str, rows: list[tuple[int, dict]]) -> str:
  """Markdown table of (devices, measurement) rows; efficiency relative to the first row.

  `host cores busy` is process CPU time / wall time over the timed steps (how many host cores the
  devices kept busy; on simulated CPU devices it shows what bounds the efficiency).
  """
  base_n, base = rows[0]
  base_rate = base['img_per_s'] / base_n
  lines = [f'{title}', '',
           '| devices | global batch | s/step | img/s | efficiency | host cores busy '
           '| compile (s) |',
           '|---|---|---|---|---|---|---|']
  for n, r in rows:
    lines.append(f'| {n} | {r["batch"]} | {r["step_s"]:.3f} | {r["img_per_s"]:.2f} | '
                 f'{100 * r["img_per_s"] / (n * base_rate):.0f} % | {r["cores"]:.2f} | '
                 f'{r["compile_s"]:.1f} |')
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/tiny.py')
  parser.add_argument('--devices', default='1,2,4,8', help='comma list of mesh sizes')
  parser.add_argument('--train_batch', type=int, default=1, help='training images per device')
  parser.add_argument('--sample_batch', type=int, default=2, help='patches per device per call')
  parser.add_argument('--steps', type=int, default=5, help='timed training steps per mesh')
  parser.add_argument('--calls', type=int, default=3, help='timed render calls per mesh')
  parser.add_argument('--parts', default='train,sample', help='train and/or sample')
  args = parser.parse_args()
  sizes = [int(v) for v in args.devices.split(',')]
  devices = jax.devices()
  if max(sizes) > len(devices):
    raise SystemExit(f'--devices asks for {max(sizes)} devices; {len(devices)} exist')
  config = _load_config(args.config)
  m, sc = config.diffusion.model, config.sample
  print(f'# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {len(devices)} x '
        f'{devices[0].device_kind} ({jax.default_backend()}, {os.cpu_count()} host cores), '
        f'config {args.config}: {m.image_size}px, {m.num_channels} channels, {m.dtype}, '
        f'remat {m.remat}; sampling {sc.timestep_respacing}, {sc.percent} %, s={sc.guidance}')
  parts = [p.strip() for p in args.parts.split(',') if p.strip()]
  if 'train' in parts:
    rows = [(n, measure_train(_load_config(args.config), n, args.train_batch, args.steps))
            for n in sizes]
    print(table(f'SDM train step, {args.train_batch} image(s) per device, mean of {args.steps} '
                'steps after a warm-up', rows) + '\n')
  if 'sample' in parts:
    rows = [(n, measure_sample(_load_config(args.config), n, args.sample_batch, args.calls))
            for n in sizes]
    print(table(f'DiffMix render call, {args.sample_batch} patch(es) per device, mean of '
                f'{args.calls} calls after a warm-up', rows))


if __name__ == '__main__':
  main()
