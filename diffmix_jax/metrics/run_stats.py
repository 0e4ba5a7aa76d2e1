"""The effect over seeds (NumPy only): per-arm mean and s.d., paired differences against baseline.

Input is `runs`, `{arm: {seed: evaluate JSON}}` (seeds as strings, as JSON keys are), the evaluate
JSON holding the scalar metrics of METRICS and `f_c`, `{class id: F1}`. Seed s of every arm shares
its HoVer-Net random streams, so arm - baseline at the same seed is a paired difference; its 95 %
interval is mean ± t(0.975, n - 1) · sd / sqrt(n), and its two-sided Wilcoxon signed-rank p is
scipy's `stats.wilcoxon` with its defaults (zero differences dropped, exact for small n). With
n = 1 a standard deviation, an interval and a p do not exist: they are None (JSON null), never 0.
"""

import math
import warnings

import numpy as np
from scipy import stats

METRICS = ('dice', 'aji', 'aji_plus', 'dq', 'sq', 'pq', 'f_d', 'acc')
REFERENCE = 'baseline'


def _values(per_seed: dict, seeds: list[str]) -> dict:
  """{metric: [value per seed]} and {'f_c': {class: [value per seed]}} over `seeds`.

  A class missing from one seed's `f_c` (no nucleus of it in truth or prediction) is left out of
  that class's list rather than counted as 0.
  """
  out = {k: [float(per_seed[s][k]) for s in seeds] for k in METRICS}
  classes = sorted({c for s in seeds for c in per_seed[s].get('f_c', {})}, key=int)
  out['f_c'] = {c: [float(per_seed[s]['f_c'][c]) for s in seeds if c in per_seed[s]['f_c']]
                for c in classes}
  return out


def _mean_sd(values: list[float]) -> dict:
  """{mean, sd, n}: sd is the sample standard deviation (ddof 1), None for n < 2."""
  n = len(values)
  a = np.asarray(values, np.float64)
  return {'mean': float(a.mean()) if n else None,
          'sd': float(a.std(ddof=1)) if n > 1 else None, 'n': n}


def wilcoxon_p(diffs: list[float]) -> float | None:
  """Two-sided Wilcoxon signed-rank p of paired differences (scipy's defaults); None for n < 2 or
  where scipy gives no number (NaN)."""
  if len(diffs) < 2:
    return None
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', RuntimeWarning)  # All-zero differences: scipy divides by 0.
    p = float(stats.wilcoxon(np.asarray(diffs, np.float64)).pvalue)
  return None if math.isnan(p) else p


def _paired(diffs: list[float]) -> dict:
  """{mean_diff, sd_diff, ci95_low, ci95_high, wilcoxon_p, n} of per-seed differences."""
  m = _mean_sd(diffs)
  out = {'mean_diff': m['mean'], 'sd_diff': m['sd'], 'ci95_low': None, 'ci95_high': None,
         'wilcoxon_p': wilcoxon_p(diffs), 'n': m['n']}
  if m['n'] > 1:
    half = float(stats.t.ppf(0.975, m['n'] - 1)) * m['sd'] / math.sqrt(m['n'])
    out['ci95_low'], out['ci95_high'] = m['mean'] - half, m['mean'] + half
  return out


def summarize(runs: dict) -> dict:
  """`{arm: {metric: {mean, sd, n}, 'f_c': {class: {mean, sd, n}}}}` over each arm's seeds."""
  out = {}
  for arm, per_seed in runs.items():
    v = _values(per_seed, sorted(per_seed, key=int))
    out[arm] = {k: _mean_sd(v[k]) for k in METRICS}
    out[arm]['f_c'] = {c: _mean_sd(x) for c, x in v['f_c'].items()}
  return out


def paired(runs: dict, reference: str = REFERENCE) -> dict:
  """`{arm: {metric: {mean_diff, sd_diff, ci95_low, ci95_high, wilcoxon_p, n}, 'f_c': {class: ...}}}`.

  Differences arm - reference at each seed both have; every arm but the reference; {} without a
  reference run. A class enters the F_c differences at the seeds where both runs score it.
  """
  if reference not in runs:
    return {}
  ref = runs[reference]
  out = {}
  for arm, per_seed in runs.items():
    if arm == reference:
      continue
    seeds = sorted(set(per_seed) & set(ref), key=int)
    out[arm] = {k: _paired([float(per_seed[s][k]) - float(ref[s][k]) for s in seeds])
                for k in METRICS}
    classes = sorted({c for s in seeds for c in per_seed[s].get('f_c', {})}, key=int)
    out[arm]['f_c'] = {
        c: _paired([float(per_seed[s]['f_c'][c]) - float(ref[s]['f_c'][c]) for s in seeds
                    if c in per_seed[s].get('f_c', {}) and c in ref[s].get('f_c', {})])
        for c in classes}
  return out


def format_mean_sd(entry: dict, digits: int = 3) -> str:
  """'0.953 ± 0.012' (n > 1), '0.953' (n = 1) or '—' (no value)."""
  if entry is None or entry.get('mean') is None:
    return '—'
  if entry.get('sd') is None:
    return f"{entry['mean']:.{digits}f}"
  return f"{entry['mean']:.{digits}f} ± {entry['sd']:.{digits}f}"
