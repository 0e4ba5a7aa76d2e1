"""Every accelerator figure in one prepared run: SDM training, synthesis, HoVer-Net, scaling.

  python bench/accelerator.py --out DIR [--budget_s 270]   # the full CoNSeP models, on a GPU/TPU
  python bench/accelerator.py --smoke --out /tmp/acc      # the same code paths, tiny shapes, CPU

Writes DIR/accelerator.json and DIR/accelerator.md. Parts, in priority order, each guarded (an error
such as out-of-memory is recorded with its message and the run goes on) and skipped, recorded as
such, when its estimate would pass `--budget_s`:
  sdm_train   the stage's jitted SDM train step (bf16, batch 16, remat on, then off): img/s, XLA
              cost-analysis FLOPs of the step, MFU against the measured and the datasheet bf16 peak,
              peak device memory, compile time;
  synthesis   the sample stage's render call (ddim100 at 55 %, guidance 1.5, cond + uncond batched,
              batch 8 per device): patches/s, peak memory, compile time;
  hovernet    HoVer-Net `original`, full size: phase-2 train img/s at batch 4, and seconds per
              1000² tile of tiled inference including post-processing; `fast` too if time allows;
  scaling     SDM train img/s on 1 device and on all local devices (skipped with one device);
  wsi         whole-slide predict (bench/wsi.py) of a generated 2048² slide with the full-size fast
              HoVer-Net: windows/s, mm²/min, seconds per part and their overlap, peak RSS (skipped
              without the [wsi] extra).
Imports jax, flax, optax, orbax, numpy, scipy, absl, ml_collections and the project's model and
training libraries only: no TensorFlow, TFDS or grain on the import path (tests/bench_test.py).
"""

import argparse
import datetime
import json
import pathlib
import sys
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parents[1]
for _p in (str(ROOT), str(ROOT / 'bench')):
  if _p not in sys.path:
    sys.path.insert(0, _p)

import jax  # noqa: E402
import numpy as np  # noqa: E402

# bf16 dense peak per device (H200: measured on the lent machine, and the datasheet figure).
PEAK_FLOPS = {'measured': 790e12, 'datasheet': 989e12}
# Part -> seconds it is expected to take (full models on an H200; tiny shapes on 2 CPU cores).
ESTIMATE_S = {'sdm_train': (120, 40), 'synthesis': (70, 20), 'hovernet': (90, 30),
              'scaling': (60, 20), 'wsi': (60, 30)}


def _configs(smoke: bool):
  """(config of the SDM parts, config of the HoVer-Net part): CoNSeP's, or tiny shapes."""
  from configs import consep, tiny  # pylint: disable=g-import-not-at-top
  if not smoke:
    return consep.get_config(), consep.get_config()
  c = tiny.get_config()
  c.data.crop_size = c.diffusion.model.image_size = c.sample.patch_size = 16
  c.diffusion.model.channel_mult, c.diffusion.model.attention_resolutions = '1', '16'
  c.sample.timestep_respacing = 'ddim4'
  h = tiny.get_config()
  h.hovernet.model.mode, h.hovernet.model.width = 'fast', 16
  h.hovernet.model.encoder_units, h.hovernet.model.decoder_units = (1, 1, 1, 1), (2, 1)
  return c, h


class Skipped(Exception):
  """A part that cannot run here (its reason is recorded as the part's status)."""


def _peak_memory() -> int | None:
  stats = jax.local_devices()[0].memory_stats()
  return int(stats['peak_bytes_in_use']) if stats and 'peak_bytes_in_use' in stats else None


def _mfu(achieved_flops: float, devices: int) -> dict:
  return {k: achieved_flops / (v * devices) for k, v in PEAK_FLOPS.items()}


def part_sdm_train(smoke: bool) -> dict:
  import sdm_train  # pylint: disable=g-import-not-at-top  (bench/sdm_train.py)
  out = {}
  for remat in (True, False):
    config, _ = _configs(smoke)
    batch, steps = (2, 2) if smoke else (16, 10)
    try:
      r = sdm_train.measure(config, batch, steps, remat)
      r['peak_memory_bytes'] = _peak_memory()
      out[f'remat_{remat}'] = r
    except Exception as e:  # pylint: disable=broad-except  (out of memory and the like: recorded)
      out[f'remat_{remat}'] = {'error': _error(e)}
  # Model FLOPs: the no-remat step's (remat's recompute is not model work); remat's if it failed.
  measured = [r for r in (out['remat_False'], out['remat_True']) if 'flops_per_step' in r]
  if measured:
    model_flops = measured[0]['flops_per_step']
    out['model_flops_per_step'] = model_flops
    out['model_flops_from'] = 'remat_False' if 'flops_per_step' in out['remat_False'] else 'remat_True'
    for r in measured:
      r['model_flops_per_s'] = model_flops / r['step_s']
      r['mfu'] = _mfu(r['model_flops_per_s'], jax.device_count())
  return out


def part_synthesis(smoke: bool) -> dict:
  import sample  # pylint: disable=g-import-not-at-top  (bench/sample.py)
  from diffmix_jax.core import sharding  # pylint: disable=g-import-not-at-top
  config, _ = _configs(smoke)
  mesh = sharding.create_mesh(config.mesh)
  n = (2 if smoke else 8) * mesh.shape[sharding.DATA]
  render, params, batch = sample.render_setup(config, mesh, n)
  start = time.perf_counter()
  jax.block_until_ready(render(params, batch['x0'], batch['y'], batch['index']))
  compile_s = time.perf_counter() - start
  calls = 1 if smoke else 3
  start = time.perf_counter()
  for _ in range(calls):
    img = render(params, batch['x0'], batch['y'], batch['index'])
  jax.block_until_ready(img)
  dt = (time.perf_counter() - start) / calls
  sc = config.sample
  return {'patches_per_call': n, 'call_s': dt, 'patches_per_s': n / dt,
          'compile_and_first_call_s': compile_s, 'peak_memory_bytes': _peak_memory(),
          'respacing': sc.timestep_respacing, 'percent': sc.percent, 'guidance': sc.guidance}


def _hovernet_train(config, batch: int, steps: int) -> dict:
  from diffmix_jax.core import sharding  # pylint: disable=g-import-not-at-top
  from diffmix_jax.hovernet import targets  # pylint: disable=g-import-not-at-top
  from diffmix_jax.hovernet import training  # pylint: disable=g-import-not-at-top
  mesh = sharding.create_mesh(config.mesh)
  trainer = training.create_trainer(config, mesh, (100, 100))
  size, out = trainer.module.patch_shapes
  inst = np.zeros((size, size), np.int32)
  inst[40:60, 40:60], inst[100:130, 90:120] = 1, 2
  tgt = targets.targets(inst, (inst > 0).astype(np.int32), out)
  rng = np.random.default_rng(0)
  n = batch * mesh.shape[sharding.DATA]
  data = sharding.global_batch({'image': rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
                                **{k: np.stack([v] * n) for k, v in tgt.items()}}, mesh)
  state, lr = trainer.init(jax.random.key(0)), trainer.lr(1, 0)
  start = time.perf_counter()
  step = trainer.steps[1].lower(state, data, lr).compile()
  compile_s = time.perf_counter() - start
  state, m = step(state, data, lr)  # Warm-up.
  jax.block_until_ready(m)
  start = time.perf_counter()
  for _ in range(steps):
    state, m = step(state, data, lr)
  jax.block_until_ready(m)
  dt = (time.perf_counter() - start) / steps
  return {'batch': n, 'step_s': dt, 'img_per_s': n / dt, 'compile_s': compile_s,
          'peak_memory_bytes': _peak_memory()}, trainer, state


def _hovernet_tile(trainer, state, side: int) -> dict:
  from diffmix_jax.hovernet import infer  # pylint: disable=g-import-not-at-top
  from diffmix_jax.hovernet import training  # pylint: disable=g-import-not-at-top
  module = trainer.module
  predict = infer.create_predictor(module, training.eval_variables(state),
                                   8 * len(jax.local_devices()))
  image = np.random.default_rng(1).integers(0, 256, (side, side, 3), dtype=np.uint8)
  start = time.perf_counter()
  infer.predict_record(predict, module, image)  # Compiles.
  first = time.perf_counter() - start
  start = time.perf_counter()
  rec = infer.predict_record(predict, module, image)
  return {'tile_side': side, 'tile_s': time.perf_counter() - start, 'first_tile_s': first,
          'nuclei_found': int(len(rec['inst_type']))}


def part_hovernet(smoke: bool, deadline: float) -> dict:
  _, config = _configs(smoke)
  out = {}
  for mode in (('fast',) if smoke else ('original', 'fast')):
    if mode == 'fast' and not smoke and time.time() > deadline - ESTIMATE_S['hovernet'][0] / 2:
      out[mode] = {'skipped': 'budget'}
      continue
    config.hovernet.model.mode = mode
    try:
      train, trainer, state = _hovernet_train(config, 1 if smoke else 4, 2 if smoke else 10)
      out[mode] = {'train_phase2': train,
                   'inference': _hovernet_tile(trainer, state, 256 if smoke else 1000)}
    except Exception as e:  # pylint: disable=broad-except
      out[mode] = {'error': _error(e)}
  return out


def part_scaling(smoke: bool) -> dict:
  import sdm_train  # pylint: disable=g-import-not-at-top
  n = len(jax.local_devices())
  if n == 1:
    raise Skipped('one device: nothing to scale over')
  out = {}
  for devices in (1, n):
    config, _ = _configs(smoke)
    config.mesh.data = devices
    per_device = 1 if smoke else 16
    r = sdm_train.measure(config, per_device * devices, 2 if smoke else 5, True)
    out[f'devices_{devices}'] = {'img_per_s': r['img_per_s'], 'step_s': r['step_s']}
  out['efficiency'] = (out[f'devices_{n}']['img_per_s'] / n) / out['devices_1']['img_per_s']
  return out


def part_wsi(smoke: bool) -> dict:
  import tempfile  # pylint: disable=g-import-not-at-top
  try:
    import openslide, pyarrow  # pylint: disable=g-import-not-at-top,multiple-imports,unused-import
  except ImportError as e:
    raise Skipped(f'the [wsi] extra is not installed ({e})') from None
  import wsi  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as folder:
    return wsi.one(1 if smoke else 8, 0 if smoke else 2, 'tiny' if smoke else 'full',
                   2 if smoke else 12, pathlib.Path(folder))


def _error(e: Exception) -> str:
  return f'{type(e).__name__}: {e}'[:2000] + '\n' + traceback.format_exc(limit=3)[-1500:]


COMMANDS = {  # What reproduces each part's figures alone (full models; --smoke has tiny shapes).
    'sdm_train': 'python bench/sdm_train.py --config configs/consep.py --batch 16 --steps 10 '
                 '--peak_tflops 989',
    'synthesis': 'python bench/sample.py --config configs/consep.py --batch 8 --calls 3',
    'hovernet': 'python bench/hovernet.py --mode original --batch 4 (train); the tile: this script',
    'scaling': 'python bench/scaling.py',
    'wsi': 'python bench/wsi.py --rows 8 --network full --chunk 12',
}


def run_parts(smoke: bool, budget_s: float) -> dict:
  """Every part in priority order within the budget; returns {part: record}."""
  start = time.time()
  deadline = start + budget_s
  parts = {'sdm_train': lambda: part_sdm_train(smoke), 'synthesis': lambda: part_synthesis(smoke),
           'hovernet': lambda: part_hovernet(smoke, deadline), 'scaling': lambda: part_scaling(smoke),
           'wsi': lambda: part_wsi(smoke)}
  out = {}
  for name, fn in parts.items():
    estimate = ESTIMATE_S[name][1 if smoke else 0]
    record = {'command': COMMANDS[name] + (' (smoke: tiny shapes)' if smoke else '')}
    if time.time() + estimate > deadline:
      record.update(status='skipped', reason=f'budget: needs ~{estimate} s, '
                    f'{max(deadline - time.time(), 0):.0f} s left of --budget_s={budget_s:g}')
    else:
      t0 = time.time()
      try:
        record.update(status='ok', figures=fn())
      except Skipped as e:
        record.update(status='skipped', reason=str(e))
      except Exception as e:  # pylint: disable=broad-except  (recorded; the next part runs)
        record.update(status='failed', error=_error(e))
      record['seconds'] = round(time.time() - t0, 1)
    print(f'{name}: {record["status"]}', flush=True)
    out[name] = record
  return out


def environment() -> dict:
  import jax.extend  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  dev = jax.devices()[0]
  backend = jax.extend.backend.get_backend()
  return {'date_utc': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M'),
          'device_kind': dev.device_kind, 'platform': dev.platform,
          'device_count': jax.device_count(), 'local_device_count': jax.local_device_count(),
          'jax': jax.__version__, 'jaxlib': jaxlib.__version__,
          'platform_version': getattr(backend, 'platform_version', None)}


def _flat(d, prefix: str = '') -> list[str]:
  """'key=value' for every leaf of a nested figures dict, numbers to 4 significant digits."""
  if not isinstance(d, dict):
    return [f'{prefix}={d:.4g}' if isinstance(d, float) else f'{prefix}={d}']
  return [item for k, v in d.items() for item in _flat(v, f'{prefix}.{k}' if prefix else str(k))]


def markdown(result: dict) -> str:
  env = result['environment']
  lines = [f"# Accelerator figures ({env['date_utc']} UTC)", '',
           f"{env['device_count']} x {env['device_kind']} ({env['platform']}), jax {env['jax']}, "
           f"jaxlib {env['jaxlib']}, {env['platform_version']}; smoke={result['smoke']}, "
           f"budget {result['budget_s']:g} s.", '', '| part | status | s | figures | command |',
           '|---|---|---|---|---|']
  for name, r in result['parts'].items():
    if 'figures' in r:
      text = ', '.join(_flat(r['figures']))
    else:
      text = r.get('reason', r.get('error', '')).split('\n')[0]
    lines.append(f"| {name} | {r['status']} | {r.get('seconds', '')} | {text.replace('|', '/')} | "
                 f"`{r['command']}` |")
  return '\n'.join(lines) + '\n'


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', required=True, help='folder for accelerator.json and .md')
  parser.add_argument('--budget_s', type=float, default=270.0)
  parser.add_argument('--smoke', action='store_true', help='tiny shapes (CPU, CI)')
  args = parser.parse_args(argv)
  from diffmix_jax import workdir as wdir  # pylint: disable=g-import-not-at-top
  result = {'environment': environment(), 'smoke': args.smoke, 'budget_s': args.budget_s,
            'parts': run_parts(args.smoke, args.budget_s)}
  out = pathlib.Path(args.out)
  wdir.atomic_write(out / 'accelerator.json',
                    json.dumps(result, indent=2, default=float).encode())
  wdir.atomic_write(out / 'accelerator.md', markdown(result).encode())
  print(f'wrote {out / "accelerator.json"} and {out / "accelerator.md"}')


if __name__ == '__main__':
  main()
