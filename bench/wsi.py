"""Whole-slide predict: windows/s, mm² of tissue per minute, seconds per part (read, network,
post-processing, write), their overlap (wall against read + max(network, post-processing) + write)
and peak RSS, on generated slides (mosaics of demo test tiles, 0.25 µm/px, pyramidal TIFF).

  python bench/wsi.py                                   # 3x3 and 6x6 tiles, tiny random network
  python bench/wsi.py --rows 8 16 --network threshold   # memory: 2048² vs 4096² px (4x the area)
  python bench/wsi.py --rows 8 --network full --chunk 12  # the official-size fast network (a GPU)

Networks: `tiny` is tests/predict_test.py's random one (width 16, one unit per group); `full` the
official-size fast HoVer-Net, randomly initialised; `threshold` no network at all, but maps a trained
one would give: nuclei = pixels darker than 150, HV = HoVer-Net's targets of their components within
each window (cheap, so large slides measure the pipeline's memory rather than the CPU's speed). Each
slide is written by one process and predicted by another, so peak RSS is the prediction's alone (the
main process: reader, network, commits, writers; each post-processing worker holds one extent map).
"""

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / 'tests'), str(REPO / 'tests' / 'slides')]


def threshold_net(patches: np.ndarray) -> np.ndarray:
  """[P, 256, 256, 3] uint8 -> [P, 164, 164, 4] float32 [tp, np, h, v] from dark components."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  from diffmix_jax.hovernet import targets  # pylint: disable=g-import-not-at-top
  out = []
  for p in patches:
    labels = ndimage.label(p.mean(-1) < 150)[0]
    fg = (labels > 0)[..., None].astype(np.float32)
    maps = np.concatenate([fg, 0.05 + 0.9 * fg, targets.hv_map(labels, 164)], axis=-1)
    out.append(targets.centre_crop(maps, 164))
  return np.stack(out).astype(np.float32)


def _model(network: str, folder: pathlib.Path):
  """(Model, predict function) of `network`."""
  from diffmix_jax import predict  # pylint: disable=g-import-not-at-top
  from diffmix_jax.hovernet import infer  # pylint: disable=g-import-not-at-top
  if network == 'full':
    import jax  # pylint: disable=g-import-not-at-top
    from diffmix_jax.hovernet import model as hovernet  # pylint: disable=g-import-not-at-top
    fields = predict._model_config({'mode': 'fast', 'nr_types': 5})  # pylint: disable=protected-access
    module = hovernet.create_hovernet(**fields)
    variables = jax.device_get(module.init(jax.random.key(0), np.zeros((1, 256, 256, 3))))
    model = predict.Model(module, variables, {'mode': 'fast', 'nr_types': 5}, None)
  else:
    import slide_files  # pylint: disable=g-import-not-at-top
    model = predict.load_model(model_dir=str(slide_files.write_model(folder / 'model')))
  if network == 'threshold':
    return model, threshold_net
  return model, infer.create_predictor(model.module, model.variables, 8)


def one(rows: int, workers: int, network: str, chunk: int, folder: pathlib.Path) -> dict:
  """Writes a rows x rows mosaic slide (in a child process), predicts it here; returns the figures."""
  from diffmix_jax import predict  # pylint: disable=g-import-not-at-top
  from diffmix_jax.slides import pipeline  # pylint: disable=g-import-not-at-top
  subprocess.run([sys.executable, __file__, f'--make={rows}', f'--path={folder / "slide.tif"}'],
                 check=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
  model, predict_fn = _model(network, folder)
  opts = pipeline.Options(chunk=chunk, workers=workers)
  before = _rss_mb()
  start = time.perf_counter()
  s = pipeline.predict_slide(folder / 'slide.tif', model, predict_fn, folder / 'out',
                             predict.class_table(5), 0.25, opts)
  wall, t = time.perf_counter() - start, s['seconds']
  return {'rows': rows, 'side_px': rows * 256, 'network': network, 'chunk': chunk,
          'workers': workers, 'tissue_mm2': s['tissue_mm2'], 'nuclei': s['nuclei'],
          'windows': s['windows'], 'wall_s': wall, **{f'{k}_s': v for k, v in t.items() if k != 'wall'},
          'overlap': wall / (t['read'] + max(t['network'], t['postprocess']) + t['write']),
          'windows_per_s': 2 * s['windows'] / wall,  # Two network passes (normalise='slide').
          'mm2_per_min': s['tissue_mm2'] / wall * 60,
          'rss_before_mb': before,  # After the imports and the model: what the slide adds is above.
          'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _rss_mb() -> float:
  """Resident memory of this process now (Linux /proc; 0 elsewhere)."""
  try:
    for line in pathlib.Path('/proc/self/status').read_text().splitlines():
      if line.startswith('VmRSS:'):
        return int(line.split()[1]) / 1024
  except OSError:
    pass
  return 0.0


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--rows', type=int, nargs='+', default=[3, 6], help='mosaic sides, in tiles')
  p.add_argument('--workers', type=int, default=2)
  p.add_argument('--chunk', type=int, default=2, help='output blocks per chunk side')
  p.add_argument('--network', choices=('tiny', 'full', 'threshold'), default='tiny')
  p.add_argument('--one', type=int, help=argparse.SUPPRESS)
  p.add_argument('--make', type=int, help=argparse.SUPPRESS)
  p.add_argument('--path', help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.make:
    import slide_files  # pylint: disable=g-import-not-at-top
    slide_files.write_tiff(pathlib.Path(a.path), slide_files.mosaic(a.make, a.make)[0], 0.25)
    return
  if a.one:
    with tempfile.TemporaryDirectory() as d:
      print(json.dumps(one(a.one, a.workers, a.network, a.chunk, pathlib.Path(d))))
    return
  results = []
  for rows in a.rows:
    cmd = [sys.executable, __file__, f'--one={rows}', f'--workers={a.workers}', f'--chunk={a.chunk}',
           f'--network={a.network}']
    out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(json.dumps(results[-1]), flush=True)
  if len(results) > 1:
    a, b = results[0], results[-1]
    grow = lambda r: r['peak_rss_mb'] - r['rss_before_mb']
    print(f'peak RSS {b["peak_rss_mb"]:.0f} MB at {b["side_px"]}² px vs {a["peak_rss_mb"]:.0f} MB at '
          f'{a["side_px"]}² px ({(b["side_px"] / a["side_px"]) ** 2:.0f}x the area): '
          f'{b["peak_rss_mb"] / a["peak_rss_mb"] - 1:+.1%}; above the imports and model: '
          f'{grow(b):.0f} MB vs {grow(a):.0f} MB')


if __name__ == '__main__':
  main()
