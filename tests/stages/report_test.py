"""Tests of the report stage on stage outputs written here."""

import json

import numpy as np
import pytest
from PIL import Image

from configs import tiny
from diffmix_jax.stages import report


def _eval_json(dice, f_c):
  return {'dice': dice, 'aji': dice - 0.1, 'aji_plus': dice - 0.08, 'dq': 0.7, 'sq': 0.8,
          'pq': dice - 0.2, 'f_d': 0.9, 'acc': 0.8, 'f_c': f_c, 'per_image': {}, 'num_images': 8,
          'num_true': 382, 'num_pred': 370}


def _png(path, colour):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.full((8, 12, 3), colour, np.uint8)).save(path)


def test_report_files_and_noop_rerun(tmp_path):
  (tmp_path / 'eval').mkdir()
  base = _eval_json(0.8125, {'1': 0.25, '2': 0.5, '3': 0.75, '4': 0.625})
  mix = _eval_json(0.8250, {'1': 0.375, '2': 0.5, '3': 0.75, '4': 0.625})
  (tmp_path / 'eval' / 'baseline.json').write_text(json.dumps(base))
  (tmp_path / 'eval' / 'diffmix.json').write_text(json.dumps(mix))
  (tmp_path / 'timings.json').write_text(json.dumps({'diffusion_train': 12.5, 'sample': 3.25}))
  fidelity = _eval_json(0.75, {'1': 0.125, '2': 0.5, '3': 0.75, '4': 0.625})
  (tmp_path / 'eval' / 'synthetic_fidelity.json').write_text(json.dumps(fidelity))
  (tmp_path / 'mixed_labels').mkdir()
  (tmp_path / 'mixed_labels' / 'summary.json').write_text(json.dumps(
      {'replacements': 7, 'targets': 9, 'normalised_entropy_before': 0.8,
       'normalised_entropy_after': 0.9, 'enlarge_moved_per_patch': 2.5}))
  _png(tmp_path / 'mixed_labels' / 'class_histogram.png', 10)
  _png(tmp_path / 'synthetic' / 'preview.png', 200)
  config = tiny.get_config()
  report.run(config, str(tmp_path))
  out = tmp_path / 'report'
  metrics = json.loads((out / 'metrics.json').read_text())
  assert metrics['baseline'] == base and metrics['diffmix'] == mix
  assert metrics['config'] == 'tiny' and metrics['timings_s']['sample'] == 3.25
  # One seed per arm: runs keyed by seed, n = 1 summaries with null spread, paired differences.
  assert metrics['runs'] == {'baseline': {'0': base}, 'diffmix': {'0': mix}}
  assert metrics['synthetic_fidelity'] == {'synthetic': fidelity, 'real_test': base}
  assert metrics['summary']['baseline']['dice'] == {'mean': 0.8125, 'sd': None, 'n': 1}
  assert metrics['summary']['diffmix']['f_c']['1'] == {'mean': 0.375, 'sd': None, 'n': 1}
  rare = metrics['paired']['diffmix']['f_c']['1']
  assert rare['mean_diff'] == 0.125 and rare['ci95_low'] is None and rare['n'] == 1
  md = (out / 'report.md').read_text()
  # The table row of each run holds its numbers; F_c per class named from config.data.class_names.
  assert '| baseline | 0.8125 | 0.7125 | 0.7325 | 0.6125 | 0.9000 | 0.8000 | 0.2500 |' in md
  assert '| diffmix | 0.8250 |' in md and 'F_c other' in md and 'F_c spindle' in md
  assert 'Replacements: 7 of 9 targets' in md and '| sample | 3.2 |' in md
  assert '| baseline | 1 | 0.812 |' in md and '| +0.000 | +0.125 | +0.000 |' in md
  for name in ('f1_per_class.png', 'class_histogram.png', 'synthetic_samples.png',
               'synthetic_fidelity.png'):
    assert (out / name).stat().st_size > 0 and f'({name})' in md
  np.testing.assert_array_equal(np.asarray(Image.open(out / 'synthetic_samples.png'))[0, 0], 200)
  assert list((out / 'tb').glob('events.out.tfevents.*'))
  stamp = (out / 'report.md').stat().st_mtime_ns
  report.run(config, str(tmp_path))
  assert (out / 'report.md').stat().st_mtime_ns == stamp  # Finished: a rerun is a no-op.


def test_added_seed_and_arm_rebuild_the_report_with_spread(tmp_path):
  (tmp_path / 'eval').mkdir()
  f_c = lambda rare: {'1': rare, '2': 0.5, '3': 0.75, '4': 0.625}
  scores = {'baseline': (0.8, 0.25), 'diffmix': (0.8, 0.375), 'baseline_s1': (0.9, 0.25),
            'diffmix_s1': (0.875, 0.5), 'enlarging': (0.75, 0.0), 'enlarging_s1': (0.8, 0.125)}
  for name, (dice, rare) in scores.items():
    (tmp_path / 'eval' / f'{name}.json').write_text(json.dumps(_eval_json(dice, f_c(rare))))
  config = tiny.get_config()
  report.run(config, str(tmp_path))
  assert 'baseline_s1' not in (tmp_path / 'report' / 'metrics.json').read_text()
  config.hovernet.train.runs = ('baseline', 'enlarging', 'diffmix')
  config.hovernet.train.seeds = (0, 1)
  report.run(config, str(tmp_path))  # New runs: rebuilt, not a no-op.
  metrics = json.loads((tmp_path / 'report' / 'metrics.json').read_text())
  assert metrics['hovernet_seeds'] == [0, 1] and set(metrics['runs']) == {
      'baseline', 'enlarging', 'diffmix'}
  assert metrics['runs']['diffmix']['1']['dice'] == 0.875 and metrics['enlarging']['dice'] == 0.75
  # Dice of diffmix: 0.8, 0.875 -> mean 0.8375, s.d. 0.053033; paired with baseline: -0.025 at s1.
  d = metrics['summary']['diffmix']['dice']
  assert d['n'] == 2 and abs(d['mean'] - 0.8375) < 1e-12 and abs(d['sd'] - 0.0530330) < 1e-6
  rare = metrics['paired']['diffmix']['f_c']['1']  # Differences 0.125, 0.25: mean 0.1875.
  assert abs(rare['mean_diff'] - 0.1875) < 1e-12 and rare['n'] == 2
  # t(0.975, 1) = 12.7062: 0.1875 -/+ 12.7062 * 0.0883883 / sqrt(2).
  assert abs(rare['ci95_low'] - (0.1875 - 12.7062 * 0.0883883 / 2 ** 0.5)) < 1e-3
  md = (tmp_path / 'report' / 'report.md').read_text()
  assert '| enlarging | 2 |' in md and 'seeds 0, 1' in md


def test_missing_evaluation_names_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match=r'eval/baseline\.json does not exist: run the '
                     'evaluate stage first'):
    report.run(tiny.get_config(), str(tmp_path))


def test_power_study_arms_seeds_and_wilcoxon_p(tmp_path):
  """configs/demo_power.py as fixed in advance; its analysis on a tiny 2-seed workdir."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  from configs import demo_power  # pylint: disable=g-import-not-at-top
  from diffmix_jax.core import arms  # pylint: disable=g-import-not-at-top
  power = demo_power.get_config()
  assert arms.arms(power) == ['baseline', 'diffmix'] and arms.seeds(power) == list(range(8))
  (tmp_path / 'eval').mkdir()
  # Rare F_c per seed: baseline 0.25, 0.5; diffmix 0.5, 0.625 -> differences 0.25, 0.125.
  scores = {'baseline': (0.8, 0.25), 'diffmix': (0.85, 0.5), 'baseline_s1': (0.9, 0.5),
            'diffmix_s1': (0.875, 0.625)}
  for name, (dice, rare) in scores.items():
    (tmp_path / 'eval' / f'{name}.json').write_text(
        json.dumps(_eval_json(dice, {'1': rare, '2': 0.5, '3': 0.75, '4': 0.625})))
  config = tiny.get_config()
  config.hovernet.train.runs = power.hovernet.train.runs
  config.hovernet.train.seeds = (0, 1)
  report.run(config, str(tmp_path))
  metrics = json.loads((tmp_path / 'report' / 'metrics.json').read_text())
  assert set(metrics['runs']) == {'baseline', 'diffmix'} and metrics['hovernet_seeds'] == [0, 1]
  paired = metrics['paired']['diffmix']
  assert set(paired) == set(report.run_stats.METRICS) | {'f_c'}
  assert set(paired['f_c']) == {'1', '2', '3', '4'}
  keys = {'mean_diff', 'sd_diff', 'ci95_low', 'ci95_high', 'wilcoxon_p', 'n'}
  for entry in [paired[k] for k in report.run_stats.METRICS] + list(paired['f_c'].values()):
    assert set(entry) == keys and entry['n'] == 2
  for key, diffs in (('1', [0.25, 0.125]),):
    assert paired['f_c'][key]['wilcoxon_p'] == stats.wilcoxon(diffs).pvalue == 0.5
  dice_diffs = [0.85 - 0.8, 0.875 - 0.9]  # One up, one down: signed ranks 2+ and 1-.
  assert paired['dice']['wilcoxon_p'] == pytest.approx(stats.wilcoxon(dice_diffs).pvalue)
  assert paired['dice']['wilcoxon_p'] == pytest.approx(1.0)
  md = (tmp_path / 'report' / 'report.md').read_text()
  assert '| Wilcoxon p (two-sided) | n |' in md and '| diffmix | 2 | 1 |' in md
  assert (tmp_path / 'report' / 'paired_seeds.png').stat().st_size > 0
