"""Benchmark of the evaluation path: post-processing of a 1000x1000 tile and metrics over CoNSeP Test.

Usage:
  python bench/eval.py [--repeats 3]

Reads the real tiles from $DIFFMIX_CONSEP_DIR (default ../shared/data/consep beside the checkout). Post-processing runs on
exact NP/HV/TP maps built from test_1's labels; the metrics compare the 14 test tiles with corrupted copies
of themselves (instances dropped, eroded, shifted, retyped, relabelled, plus false positives). Prints a
Markdown section for BENCHMARKS.md.
"""

import argparse
import os
import pathlib
import platform
import sys
import tempfile
import time

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from diffmix_jax.metrics import records  # noqa: E402
from diffmix_jax.metrics import postprocess  # noqa: E402
from diffmix_jax.metrics import seg_metrics  # noqa: E402


def exact_hv(label: np.ndarray) -> np.ndarray:
  """[H, W, 2] float32 HV map: per-instance offsets from the centre of mass, each side scaled to 1."""
  ids = np.unique(label)
  ids = ids[ids > 0]
  hv = np.zeros(label.shape + (2,), np.float32)
  rows, cols = np.indices(label.shape).astype(np.float64)
  for ch, coord in enumerate((cols, rows)):
    mean = np.zeros(label.max() + 1)
    mean[ids] = ndimage.mean(coord, label, ids)
    off = coord - mean[label]
    lo = np.ones(label.max() + 1)
    hi = np.ones(label.max() + 1)
    lo[ids] = np.maximum(-ndimage.minimum(off, label, ids), 1e-12)
    hi[ids] = np.maximum(ndimage.maximum(off, label, ids), 1e-12)
    hv[..., ch] = np.where(label > 0, np.where(off < 0, off / lo[label], off / hi[label]), 0)
  return hv


def corrupt(rec: dict, rng: np.random.Generator) -> dict:
  """A plausible prediction from the truth: 5% dropped, 30% eroded, 30% shifted by <= 3 px, 15% retyped,
  ids shuffled and non-contiguous, and 3% extra false-positive discs."""
  inst_map = rec['inst_map']
  out = np.zeros_like(inst_map)
  types = {}
  new_ids = rng.permutation(np.arange(1, 4 * inst_map.max() + 100))
  for idx, sl in enumerate(ndimage.find_objects(inst_map), start=1):
    if sl is None or rng.random() < 0.05:
      continue
    mask = inst_map[sl] == idx
    op = rng.random()
    if op < 0.3:
      mask = ndimage.binary_erosion(mask, iterations=int(rng.integers(1, 3)))
    rr, cc = np.nonzero(mask)
    rr, cc = rr + sl[0].start, cc + sl[1].start
    if 0.3 <= op < 0.6:
      dr, dc = rng.integers(-3, 4, 2)
      rr, cc = rr + dr, cc + dc
    ok = (rr >= 0) & (rr < out.shape[0]) & (cc >= 0) & (cc < out.shape[1])
    rr, cc = rr[ok], cc[ok]
    free = out[rr, cc] == 0
    if free.sum() < 3:
      continue
    new = new_ids[idx]
    out[rr[free], cc[free]] = new
    t = int(rec['inst_type'][idx - 1])
    types[new] = int(rng.integers(1, 5)) if rng.random() < 0.15 else t
  rows, cols = np.indices(out.shape)
  for _ in range(int(0.03 * inst_map.max())):
    r, c = rng.integers(8, out.shape[0] - 8, 2)
    disc = ((rows - r) ** 2 + (cols - c) ** 2 <= rng.integers(3, 7) ** 2) & (out == 0)
    if disc.sum() >= 10:
      new = new_ids[len(types) + inst_map.max() + 1]
      out[disc] = new
      types[new] = int(rng.integers(1, 5))
  ids = np.array([i for i in np.unique(out) if i])
  cy = ndimage.mean(rows, out, ids)
  cx = ndimage.mean(cols, out, ids)
  return dict(inst_map=out, inst_type=np.array([types[i] for i in ids], np.int32),
              inst_centroid=np.stack([cx, cy], -1))


def timed(fn, repeats):
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    result = fn()
    times.append(time.perf_counter() - t0)
  return result, min(times), float(np.median(times))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()
  consep = pathlib.Path(os.environ.get('DIFFMIX_CONSEP_DIR') or pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'consep')
  labels = sorted((consep / 'Test' / 'Labels').glob('*.mat'),
                  key=lambda p: int(p.stem.split('_')[-1]))
  if len(labels) != 14:
    sys.exit(f'expected 14 test tiles in {consep}/Test/Labels, found {len(labels)}')

  # Post-processing of one full tile (exact maps of test_1).
  import scipy.io as sio  # pylint: disable=g-import-not-at-top
  raw = sio.loadmat(labels[0])
  label, type_map = raw['inst_map'].astype(np.int32), raw['type_map'].astype(np.float32)
  pred_map = np.dstack([type_map, (label > 0).astype(np.float32), exact_hv(label)])
  (inst_map, info), pp_best, pp_med = timed(lambda: postprocess.process(pred_map, 5), args.repeats)
  _, sep_best, _ = timed(lambda: postprocess.separate_instances(*np.moveaxis(pred_map[..., 1:], -1, 0)),
                         args.repeats)
  pp_metrics = seg_metrics.instance_metrics(label, inst_map)

  # Metrics over the 14 test tiles against corrupted copies.
  rng = np.random.default_rng(0)
  trues = [records.load_mat(p) for p in labels]
  preds = [corrupt(t, rng) for t in trues]
  names = [p.stem for p in labels]
  pairs = list(zip(trues, preds))
  metrics, arr_best, arr_med = timed(lambda: records.evaluate_arrays(pairs, names=names),
                                     args.repeats)
  with tempfile.TemporaryDirectory() as tmp:
    pred_dir = pathlib.Path(tmp)
    for name, pred in zip(names, preds):
      records.save_mat(pred_dir / f'{name}.mat', pred)
    dirs, dir_best, dir_med = timed(
        lambda: records.evaluate_dirs(consep / 'Test' / 'Labels', pred_dir), args.repeats)
  assert dirs == metrics

  print('## Evaluation: post-processing and metrics (bench/eval.py)\n')
  print(f'- Device: CPU, {os.cpu_count()} cores ({platform.processor() or platform.machine()}), '
        f'Python {platform.python_version()}, NumPy {np.__version__}.')
  print(f'- Command: `python bench/eval.py --repeats {args.repeats}` '
        f'(DIFFMIX_CONSEP_DIR={consep}). Times: best / median of {args.repeats}.\n')
  print('| measured | time (s) | target | notes |')
  print('|---|---|---|---|')
  print(f'| `postprocess.process`, 1000x1000 tile (test_1, exact NP/HV/TP maps) | {pp_best:.2f} / '
        f'{pp_med:.2f} | | watershed part `separate_instances` {sep_best:.2f} s; {len(info)} '
        f'instances; vs truth AJI {pp_metrics["aji"]:.4f}, PQ {pp_metrics["pq"]:.4f} |')
  print(f'| `records.evaluate_arrays`, 14 Test tiles vs corrupted truth | {arr_best:.2f} / '
        f'{arr_med:.2f} | < 10 s | {metrics["num_true"]} true, {metrics["num_pred"]} predicted '
        'nuclei |')
  print(f'| `records.evaluate_dirs` (same, reading 28 `.mat` files) | {dir_best:.2f} / '
        f'{dir_med:.2f} | | |')
  f_c = ', '.join(f'{k}: {v:.4f}' for k, v in metrics['f_c'].items())
  print(f'\nScores of the corrupted predictions (a sanity check, not a result): Dice '
        f'{metrics["dice"]:.4f}, AJI {metrics["aji"]:.4f}, AJI+ {metrics["aji_plus"]:.4f}, DQ '
        f'{metrics["dq"]:.4f}, SQ {metrics["sq"]:.4f}, PQ {metrics["pq"]:.4f}, F_d '
        f'{metrics["f_d"]:.4f}, acc {metrics["acc"]:.4f}, F_c {{{f_c}}}.')


if __name__ == '__main__':
  main()
