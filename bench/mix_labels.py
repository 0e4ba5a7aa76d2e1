"""Benchmark: balancing + enlarging label maps of the CoNSeP train tiles on the host CPU (goal: ≤ 1 s per 1000² tile).

  python bench/mix_labels.py --consep_dir /path/to/consep [--repeats 3] [--num_workers 0]

Loading the .mat files is not timed. Prints the wall time of the per-tile table build, balancing
(docs/method.md §2.4) and enlarging (§3.3, 100 grid patches per 1000² tile), in total and per tile.
"""

import argparse
import os
import pathlib
import platform
import sys
import time

import numpy as np
import scipy.io

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from diffmix_jax.mixing import balancing  # noqa: E402
from diffmix_jax.mixing import enlarging  # noqa: E402
from diffmix_jax.mixing import tiles as mixing_tiles  # noqa: E402
from tfds_builders import raw_folders


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--consep_dir', default=os.environ.get('DIFFMIX_CONSEP_DIR', ''))
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--num_workers', type=int, default=0)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  folder = pathlib.Path(args.consep_dir) / 'Train' / 'Labels'
  if not folder.is_dir():
    sys.exit(f'--consep_dir (or $DIFFMIX_CONSEP_DIR) must hold Train/Labels/*.mat; got {folder}')
  raw = []
  for path in sorted(folder.glob('*.mat'), key=lambda p: raw_folders.natural_key(p.stem)):
    m = scipy.io.loadmat(path)
    raw.append((path.stem, m['inst_map'].astype(np.int32), m['type_map'].astype(np.int32)))
  n = len(raw)
  bp, ep = balancing.BalanceParams(), enlarging.EnlargeParams()
  print(f'{n} tiles, {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, '
        f'num_workers={args.num_workers}')
  best = None
  for rep in range(args.repeats):
    t0 = time.perf_counter()
    tiles = [mixing_tiles.prepare_tile(name, inst, typ, 5) for name, inst, typ in raw]
    t1 = time.perf_counter()
    bal = balancing.balance_all(tiles, bp, args.seed, args.num_workers)
    t2 = time.perf_counter()
    enl = enlarging.enlarge_all(tiles, ep, args.seed, args.num_workers)
    t3 = time.perf_counter()
    times = (t1 - t0, t2 - t1, t3 - t2, t3 - t0)
    reps = sum(len(b.provenance['target_id']) for b in bal)
    patches = sum(len(e.offsets) for e in enl)
    print(f'run {rep}: prepare {times[0]:.2f} s, balance {times[1]:.2f} s ({reps} replacements), '
          f'enlarge {times[2]:.2f} s ({patches} patches), total {times[3]:.2f} s = '
          f'{times[3] / n:.3f} s per tile')
    best = times if best is None or times[3] < best[3] else best
  print(f'best: total {best[3]:.2f} s for {n} tiles = {best[3] / n:.3f} s per tile '
        f'(prepare {best[0] / n:.3f}, balance {best[1] / n:.3f}, enlarge {best[2] / n:.3f})')
  donors = balancing.rare_donors(tiles, bp)
  per_tile = []
  for i, t in enumerate(tiles):
    t0 = time.perf_counter()
    balancing.balance_tile(tiles, i, bp, args.seed, donors)
    enlarging.enlarge_tile(t, i, ep, args.seed)
    per_tile.append((time.perf_counter() - t0, t.name, int(t.areas[1:].astype(bool).sum())))
  slow = max(per_tile)
  print(f'slowest tile (balance + enlarge, serial): {slow[1]} with {slow[2]} nuclei, {slow[0]:.3f} s')


if __name__ == '__main__':
  main()
