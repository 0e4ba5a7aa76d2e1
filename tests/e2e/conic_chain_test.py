"""The tiny chain through the real `main` on a generated set in CoNIC's release layout.

The set: 20 patches of 128 px cut from five demo tiles (one source image each, in three cohorts),
classes recoded to CoNIC's ids, written as images.npy / labels.npy / patch_info.csv. The run leaves
every class field to CoNIC's class table (0 and ''), leaves out the `consep` cohort and draws half
of each other cohort's images for test.
"""

import json

import numpy as np
import pytest

from conftest import rescore_from_files
from diffmix_jax import workdir as wdir
from main_test import _one_device_env
from main_test import assert_noop_rerun
from main_test import run_main
from tfds_builders import class_tables
from tfds_builders.demo_nuclei import generate

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
# Demo classes (other, inflammatory, epithelial, spindle) as CoNIC ids (neutrophil, lymphocyte,
# epithelial, connective).
TO_CONIC = np.array([0, 1, 3, 2, 6], np.int32)
SOURCES = ('crag_1', 'crag_2', 'glas_1', 'glas_2', 'consep_1')


def write_conic_set(root):
  """Writes the set; returns the patch names."""
  images, labels, rows = [], [], []
  for i, source in enumerate(SOURCES):
    image, inst, types = generate.make_tile(generate.SEED, 'train', i)
    for k in range(4):
      y, x = 128 * (k // 2), 128 * (k % 2)
      images.append(image[y:y + 128, x:x + 128])
      labels.append(np.stack([inst[y:y + 128, x:x + 128], TO_CONIC[types[y:y + 128, x:x + 128]]],
                             -1))
      rows.append(f'{source}-{k:04d}')
  root.mkdir(parents=True)
  np.save(root / 'images.npy', np.stack(images))
  np.save(root / 'labels.npy', np.stack(labels).astype(np.int32))
  (root / 'patch_info.csv').write_text('patch_info\n' + '\n'.join(rows) + '\n')
  return rows


def test_tiny_chain_on_a_conic_layout_set_then_a_noop_rerun(tmp_path):
  """Every stage of configs/tiny.py through one `main` on the CoNIC-layout set: class fields from
  CoNIC's table, the cohort split, both HoVer-Net runs evaluated, the baseline scored on every
  synthetic patch, a report whose numbers are the saved predictions' scores; then the same command
  again writes nothing."""
  write_conic_set(tmp_path / 'conic')
  workdir = tmp_path / 'w'
  args = (
      '--config.data.name=conic',
      f'--config.data.manual_dir={tmp_path / "conic"}', '--config.data.conic.exclude=consep',
      '--config.data.conic.test_fraction=0.5', '--config.data.num_classes=0',
      '--config.data.class_names=()', '--config.mix.balance.rare_classes=()',
      '--config.mix.balance.common_classes=()', '--config.mix.balance.border_margin=8',
      '--config.diffusion.train.phase1_steps=4', '--config.diffusion.train.phase2_steps=2',
      '--config.diffusion.train.sample_every_steps=0',
      # One 256-px HoVer-Net window per 128-px patch (64 px mirrored a side).
      '--config.hovernet.train.patch_step=128', '--config.hovernet.train.phase2_batch_size=8')
  out = run_main('--config', 'configs/tiny.py', '--workdir', str(workdir), *args,
                 env=_one_device_env())
  assert out.returncode == 0, out.stderr[-4000:]
  config = json.loads((workdir / 'config.json').read_text())  # The class fields from the table.
  assert config['data']['num_classes'] == config['hovernet']['model']['nr_types'] == 7
  assert config['mix']['balance']['rare_classes'] == [1, 5]
  summary = json.loads((workdir / 'build_data' / 'summary.json').read_text())
  assert summary['split']['excluded'] == ['consep']
  assert sorted(summary['split']['test'] + summary['split']['train']) == list(SOURCES[:4])
  assert [summary['splits'][k]['tiles'] for k in ('train', 'test')] == [8, 8]
  assert summary['classes'] == class_tables.CONIC.to_json()
  assert 'neutrophil*' in out.stdout and 'eosinophil*' in out.stdout  # The printed counts.
  for run in ('baseline', 'diffmix'):
    result = json.loads((workdir / 'eval' / f'{run}.json').read_text())
    assert result['num_images'] == 8 and 'mpq_plus' in result and 'pannuke' not in result
  metrics = json.loads((workdir / 'report' / 'metrics.json').read_text())
  for run in ('baseline', 'diffmix'):  # The report's numbers are the saved predictions' scores.
    want = rescore_from_files(workdir / 'eval' / run)
    assert metrics[run]['dice'] == pytest.approx(want['dice'], abs=1e-12), run
    assert [metrics[run][k] for k in ('num_images', 'num_true', 'num_pred')] == [
        8, want['num_true'], want['num_pred']], run
    assert want['num_true'] > 0 and want['num_pred'] > 0, (run, want)
  assert metrics['config'] == 'tiny'
  fidelity = metrics['synthetic_fidelity']  # The baseline model on every synthetic patch.
  assert fidelity['real_test'] == metrics['baseline']
  patches = sorted((workdir / 'synthetic' / 'consep_format' / 'Images').glob('*.png'))
  assert patches and sorted(fidelity['synthetic']['per_image']) == [p.stem for p in patches]
  assert fidelity['synthetic']['num_images'] == len(patches)
  assert (workdir / 'report' / 'synthetic_fidelity.png').exists()
  md = (workdir / 'report' / 'report.md').read_text()
  assert '| baseline |' in md and '| diffmix |' in md
  assert (workdir / 'report' / 'f1_per_class.png').exists()
  timings = json.loads((workdir / wdir.TIMINGS).read_text())
  assert {'build_data', 'diffusion_train', 'mix_labels', 'sample', 'hovernet_train', 'evaluate',
          'report'} <= set(timings), timings
  assert_noop_rerun(workdir, *args, env=_one_device_env())
