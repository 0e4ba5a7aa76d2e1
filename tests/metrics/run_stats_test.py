"""Tests of diffmix_jax.metrics.run_stats on hand-computed cases."""

import json
import math

import pytest

from diffmix_jax.metrics import run_stats

T_975_2 = 4.302652729749464  # t(0.975, 2 degrees of freedom), from tables.


def _eval(base, f_c):
  """An evaluate JSON whose every scalar metric is `base` plus a fixed offset per metric."""
  out = {k: base + 0.01 * i for i, k in enumerate(run_stats.METRICS)}
  out['f_c'] = f_c
  return out


RUNS = {
    'baseline': {'0': _eval(0.5, {'1': 0.1, '2': 0.4}), '1': _eval(0.6, {'1': 0.2, '2': 0.5}),
                 '2': _eval(0.7, {'1': 0.3, '2': 0.6})},
    'diffmix': {'0': _eval(0.6, {'1': 0.2, '2': 0.4}), '1': _eval(0.8, {'1': 0.5}),
                '2': _eval(1.0, {'1': 0.6, '2': 0.6})},
}


def test_summary_is_mean_and_sample_sd_per_arm_and_class():
  s = run_stats.summarize(RUNS)
  assert s['baseline']['dice'] == pytest.approx({'mean': 0.6, 'sd': 0.1, 'n': 3})
  assert s['baseline']['acc']['mean'] == pytest.approx(0.67)  # 7th metric: offset 0.07.
  assert s['diffmix']['pq'] == pytest.approx({'mean': 0.85, 'sd': 0.2, 'n': 3})
  assert s['baseline']['f_c']['1'] == pytest.approx({'mean': 0.2, 'sd': 0.1, 'n': 3})
  # Class 2 is missing from diffmix seed 1: left out, not counted as 0.
  assert s['diffmix']['f_c']['2'] == pytest.approx({'mean': 0.5, 'sd': math.sqrt(0.02), 'n': 2})


def test_paired_differences_and_t_interval():
  p = run_stats.paired(RUNS)
  assert set(p) == {'diffmix'}
  d = p['diffmix']['dice']  # Differences 0.1, 0.2, 0.3.
  half = T_975_2 * 0.1 / math.sqrt(3)
  # Wilcoxon, exact: 3 positive differences, P(T- = 0) = 1/8, two-sided 2/8.
  assert d == pytest.approx({'mean_diff': 0.2, 'sd_diff': 0.1, 'ci95_low': 0.2 - half,
                             'ci95_high': 0.2 + half, 'wilcoxon_p': 0.25, 'n': 3}, rel=1e-9)
  rare = p['diffmix']['f_c']['1']  # Differences 0.1, 0.3, 0.3.
  assert rare['mean_diff'] == pytest.approx(0.7 / 3)
  assert rare['sd_diff'] == pytest.approx(math.sqrt(((0.1 - 0.7 / 3) ** 2 + 2 * (0.3 - 0.7 / 3) ** 2)
                                                    / 2))
  # Class 2 at the seeds both runs score it (0 and 2): differences 0 and 0, t(0.975, 1); no
  # evidence either way, Wilcoxon p 1.
  assert p['diffmix']['f_c']['2'] == pytest.approx(
      {'mean_diff': 0.0, 'sd_diff': 0.0, 'ci95_low': 0.0, 'ci95_high': 0.0, 'wilcoxon_p': 1.0,
       'n': 2}, abs=1e-12)


def test_wilcoxon_p_is_the_exact_signed_rank_p():
  # 8 differences, the smallest negative: T- = 1; of the 2^8 sign patterns T- <= 1 in 2 (no
  # negative, or only rank 1), two-sided 4 / 256.
  diffs = [-0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08]
  assert run_stats.wilcoxon_p(diffs) == pytest.approx(4 / 256, rel=1e-12)
  # Ranks 1-8, negatives at ranks 1, 2, 3 and 4: T- = 10, T+ = 26, P(T- <= 10) = 40 / 256 by
  # counting subsets of {1..8} with sum <= 10; two-sided 80 / 256.
  assert run_stats.wilcoxon_p([-1, -2, -3, -4, 5, 6, 7, 8]) == pytest.approx(80 / 256, rel=1e-12)
  assert run_stats.wilcoxon_p([0.3]) is None


def test_one_seed_gives_null_spread_and_no_interval():
  runs = {arm: {'0': per_seed['0']} for arm, per_seed in RUNS.items()}
  s, p = run_stats.summarize(runs), run_stats.paired(runs)
  assert s['baseline']['dice'] == {'mean': 0.5, 'sd': None, 'n': 1}
  assert p['diffmix']['dice'] == pytest.approx(
      {'mean_diff': 0.1, 'sd_diff': None, 'ci95_low': None, 'ci95_high': None,
       'wilcoxon_p': None, 'n': 1})
  text = json.dumps({'summary': s, 'paired': p})
  assert '"sd": null' in text and '"ci95_low": null' in text and 'NaN' not in text
  assert run_stats.format_mean_sd(s['baseline']['dice']) == '0.500'
  assert run_stats.format_mean_sd({'mean': 0.5, 'sd': 0.0125, 'n': 2}) == '0.500 ± 0.013'
  assert run_stats.paired({'diffmix': runs['diffmix']}) == {}  # No baseline, nothing paired.
