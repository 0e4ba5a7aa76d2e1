"""Whole-slide predict: windows/s, mm² of tissue per minute, seconds per part (read, network,
post-processing, write), their overlap (wall against read + max(network, post-processing) + write)
and peak RSS, on generated slides (mosaics of demo test tiles, 0.25 µm/px, pyramidal TIFF).

  python bench/wsi.py                          # 3x3 and 6x6 tiles (4x the area), tiny random network
  python bench/wsi.py --rows=8 --full_model    # the official-size fast network (for a GPU)

Each size runs in its own process; peak RSS is the main process's (reader, network, commits and
writers). The post-processing workers hold one extent map each (about 45 MB at the default chunk). The tiny network is tests/predict_test.py's (width 16, one unit per group): it
measures the pipeline, not a trained model's speed.
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

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / 'tests'), str(REPO / 'tests' / 'slides')]


def one(rows: int, workers: int, full: bool, chunk: int, folder: pathlib.Path) -> dict:
  """Predicts a rows x rows mosaic slide in this process; returns the figures."""
  import slide_files  # pylint: disable=g-import-not-at-top
  from diffmix_jax import predict  # pylint: disable=g-import-not-at-top
  from diffmix_jax.hovernet import infer  # pylint: disable=g-import-not-at-top
  from diffmix_jax.slides import pipeline  # pylint: disable=g-import-not-at-top
  slide_files.write_tiff(folder / 'slide.tif', slide_files.mosaic(rows, rows)[0], 0.25)
  if full:
    from diffmix_jax.hovernet import model as hovernet  # pylint: disable=g-import-not-at-top
    import jax, jax.numpy as jnp  # pylint: disable=g-import-not-at-top,multiple-imports
    module = hovernet.create_hovernet(**predict._model_config({'mode': 'fast', 'nr_types': 5}))  # pylint: disable=protected-access
    model = predict.Model(module, jax.device_get(module.init(jax.random.key(0), jnp.zeros((1, 256, 256, 3)))), {}, None)
  else:
    model = predict.load_model(model_dir=str(slide_files.write_model(folder / 'model')))
  predictor = infer.create_predictor(model.module, model.variables, 8)
  opts = pipeline.Options(chunk=chunk, workers=workers)
  start = time.perf_counter()
  s = pipeline.predict_slide(folder / 'slide.tif', model, predictor, folder / 'out',
                             predict.class_table(5), 0.25, opts)
  wall = time.perf_counter() - start
  t = s['seconds']
  return {'rows': rows, 'side_px': rows * 256, 'tissue_mm2': s['tissue_mm2'], 'nuclei': s['nuclei'],
          'windows': s['windows'], 'wall_s': wall, **{f'{k}_s': v for k, v in t.items() if k != 'wall'},
          'overlap': wall / (t['read'] + max(t['network'], t['postprocess']) + t['write']),
          'windows_per_s': 2 * s['windows'] / wall,  # Two network passes (normalise='slide').
          'mm2_per_min': s['tissue_mm2'] / wall * 60,
          'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--rows', type=int, nargs='+', default=[3, 6], help='mosaic sides, in tiles')
  p.add_argument('--workers', type=int, default=2)
  p.add_argument('--chunk', type=int, default=2, help='output blocks per chunk side')
  p.add_argument('--full_model', action='store_true')
  p.add_argument('--one', type=int, help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.one:
    with tempfile.TemporaryDirectory() as d:
      print(json.dumps(one(a.one, a.workers, a.full_model, a.chunk, pathlib.Path(d))))
    return
  results = []
  for rows in a.rows:
    cmd = [sys.executable, __file__, f'--one={rows}', f'--workers={a.workers}', f'--chunk={a.chunk}']
    out = subprocess.run(cmd + (['--full_model'] if a.full_model else []), capture_output=True,
                         text=True, check=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(json.dumps(results[-1]))
  if len(results) > 1:
    print(f'peak RSS {results[-1]["peak_rss_mb"]:.0f} MB at {results[-1]["side_px"]}^2 px vs '
          f'{results[0]["peak_rss_mb"]:.0f} MB at {results[0]["side_px"]}^2: '
          f'{results[-1]["peak_rss_mb"] / results[0]["peak_rss_mb"] - 1:+.1%}')


if __name__ == '__main__':
  main()
