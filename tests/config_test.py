"""Tests of configs/: every experiment config loads and validates; bad values name their field."""

import importlib
import json
import pathlib
import re
import subprocess
import sys

import pytest

from conftest import HANG_TIMEOUT
from configs import common
from diffmix_jax.core import arms
from diffmix_jax import config_checks
from diffmix_jax.data import datasets

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ('consep', 'glysac', 'consep_smoke', 'demo', 'demo_study', 'demo_power', 'tiny', 'conic',
           'pannuke', 'folder_example')


@pytest.mark.parametrize('name', CONFIGS)
def test_configs_load_and_validate(name, tmp_path):
  c = importlib.import_module(f'configs.{name}').get_config()
  if c.hovernet.train.phase1_epochs:  # The paper's configs: phase 1 needs the ImageNet file.
    (tmp_path / 'encoder.tar').write_bytes(b'')
    c.hovernet.train.pretrained = str(tmp_path / 'encoder.tar')
  (tmp_path / 'build_data').mkdir()  # A workdir whose dataset is built: no manual_dir needed.
  (tmp_path / 'build_data' / 'DONE').write_text('{}')
  classes = {'names': ['background', 'tumour', 'immune', 'stroma'], 'rare': [2], 'common': [1, 3]}
  (tmp_path / 'build_data' / 'summary.json').write_text(
      json.dumps({'dataset': 'nuclei_folder', 'classes': classes}))
  datasets.resolve_classes(c, str(tmp_path))  # As main does before the checks.
  assert config_checks.check(c, str(tmp_path)) == [s.strip() for s in c.stages.split(',')]
  if name == 'folder_example':  # Its class fields are read from the built dataset's table.
    assert (c.data.num_classes, c.diffusion.model.num_classes, c.hovernet.model.nr_types,
            c.mix.balance.common_classes) == (4, 4, 4, (1, 3))
    assert c.data.class_names == ('background', 'tumour', 'immune', 'stroma')
  # Configs override values only: every nested field of the base config, none added, each of the
  # base's type (a typo such as `c.hovernet.train.lr_stepp = ...` in a config adds a leaf and fails).
  assert _leaf_types(c.to_dict()) == _leaf_types(common.base_config().to_dict())


def _leaf_types(tree: dict, prefix: str = '') -> dict[str, str]:
  """{'a.b.c': type name} of every non-dict value of a nested dict."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_leaf_types(value, f'{prefix}{key}.'))
    else:
      out[prefix + key] = type(value).__name__
  return out


def test_leaf_types_see_a_nested_field_added_or_retyped():
  base = common.base_config().to_dict()
  assert len(_leaf_types(base)) > 100
  added = common.base_config().to_dict()
  added['hovernet']['train']['lr_stepp'] = 3
  retyped = common.base_config().to_dict()
  retyped['hovernet']['train']['lr'] = str(retyped['hovernet']['train']['lr'])
  for other in (added, retyped):
    assert _leaf_types(other) != _leaf_types(base)


def test_official_sdm_flag_names_are_kept():
  m = common.base_config().diffusion.model
  for flag in ('image_size', 'num_channels', 'num_res_blocks', 'channel_mult',
               'attention_resolutions', 'num_head_channels', 'resblock_updown',
               'use_scale_shift_norm', 'learn_sigma', 'num_classes', 'no_instance', 'dropout'):
    assert flag in m


def test_paper_settings_in_dataset_configs():
  consep = importlib.import_module('configs.consep').get_config()
  glysac = importlib.import_module('configs.glysac').get_config()
  assert consep.diffusion.model.num_classes == 5 and glysac.diffusion.model.num_classes == 4
  assert consep.diffusion.model.num_channels == 256 and consep.diffusion.train.batch_size == 16
  assert consep.sample.guidance == 1.5 and glysac.sample.guidance == 2.0


@pytest.mark.parametrize('field,value,match', [
    ('data.name', 'lizard', 'config.data.name'),
    ('data.labels', 'raw', 'config.data.labels'),
    ('data.pannuke.test_folds', (2,), 'fold 2 is also in config.data.pannuke.train_folds'),
    ('data.num_classes', 7, 'must be 5, the class count of the consep class table'),
    # Tied to data.num_classes: setting it sets the class count, checked against the table.
    ('diffusion.model.num_classes', 4, 'config.data.num_classes=4: must be 5, the class count'),
    ('data.class_names', ('a', 'b'), 'config.data.class_names'),
    ('diffusion.train.batch_size', 0, 'config.diffusion.train.batch_size=0'),
    ('mix.balance.rare_classes', (7,), r"config.mix.balance.rare_classes=\(7,\): .*: \[7\]"),
    ('mix.balance.common_classes', (1, 2), 'class id 1 is also in config.mix.balance.rare_classes'),
    ('mix.balance.common_classes', (2, 'x'), 'config.mix.balance.common_classes'),
    ('sample.percent', 120, 'config.sample.percent=120'),
    ('data.crop_size', 128, 'config.data.crop_size=128: must equal'),
    ('hovernet.model.head_init', 'normal', "config.hovernet.model.head_init='normal'"),
    ('hovernet.model.mode', 'slow', "config.hovernet.model.mode='slow'"),
    ('hovernet.train.runs', ('baseline', 'basline'), r"config.hovernet.train.runs=.*: \['basline'\]"),
    ('hovernet.train.runs', ('diffmix', 'diffmix'), 'expected a tuple of distinct arms'),
    ('hovernet.train.runs', ('baseline,diffmix',), r"on the command line a tuple of names is written"),
    ('hovernet.train.seeds', (0, 'x'), r"config.hovernet.train.seeds=\(0, 'x'\)"),
    ('hovernet.train.seeds', (1, 1), r"config.hovernet.train.seeds=\(1, 1\)"),
    ('hovernet.train.seeds', (-1,), r"config.hovernet.train.seeds=\(-1,\)"),
])
def test_bad_values_name_the_field(field, value, match):
  c = importlib.import_module('configs.consep').get_config()
  c.stages = 'diffusion_train,mix_labels'  # No files read: the values alone are checked.
  section, key = field.rsplit('.', 1)
  node = c
  for part in section.split('.'):
    node = node[part]
  node[key] = value
  with pytest.raises(ValueError, match=match):
    config_checks.check(c)


@pytest.mark.parametrize('name', ['consep', 'glysac'])
def test_frozen_phase_without_imagenet_encoder_is_rejected(name, tmp_path):
  """Phase 1 trains decoders on a frozen encoder: from random weights it is an error, named."""
  c = importlib.import_module(f'configs.{name}').get_config()
  c.stages = 'hovernet_train'
  with pytest.raises(ValueError, match=r"config\.hovernet\.train\.pretrained='': phase 1 "
                     r'\(config\.hovernet\.train\.phase1_epochs=50\) .*ImageNet-ResNet50-Preact'):
    config_checks.check(c)
  c.hovernet.train.pretrained = str(tmp_path / 'absent.tar')
  with pytest.raises(ValueError, match=r"pretrained='.*absent\.tar': no such file"):
    config_checks.check(c)
  c.stages = 'diffusion_train'  # Without HoVer-Net training the field is not read.
  config_checks.check(c)
  c.stages = 'hovernet_train'
  c.hovernet.train.phase1_epochs = 0  # Everything trainable from scratch: allowed.
  c.hovernet.train.pretrained = ''
  config_checks.check(c)


def test_arms_seeds_and_run_names():
  c = importlib.import_module('configs.tiny').get_config()
  c.hovernet.train.runs, c.hovernet.train.seeds = ('diffmix', 'baseline', 'enlarging'), (2, 0)
  # Seeds outer (a killed study has whole seeds done); seed 0 keeps the single-seed names.
  assert arms.runs(c) == [('diffmix', 2), ('baseline', 2), ('enlarging', 2), ('diffmix', 0),
                          ('baseline', 0), ('enlarging', 0)]
  assert [arms.run_name(a, s) for a, s in arms.runs(c)][:3] == [
      'diffmix_s2', 'baseline_s2', 'enlarging_s2']
  assert arms.fidelity_run(c) == 'baseline_s2'  # The first seed's baseline.
  c.hovernet.train.runs = ('balancing',)
  assert arms.fidelity_run(c) is None
  assert arms.ARMS['diffmix'] == arms.ARMS['balancing'] + arms.ARMS['enlarging']


def test_tile_subsets_name_known_tiles_once(tmp_path, monkeypatch):
  """data.train_tiles / data.test_tiles: checked as main starts, against the demo set's names or
  the CoNSeP folder's files; the folder absent, `build_data` reports it instead."""
  c = importlib.import_module('configs.demo').get_config()
  c.data.train_tiles, c.data.test_tiles = ('train_1', 'train_32'), ('test_8',)
  config_checks.check(c)
  c.data.train_tiles = ('train_1', 'train_33')
  with pytest.raises(ValueError, match=r"config\.data\.train_tiles: unknown tile\(s\) \['train_33'\]; "
                     r'the train split of demo_nuclei holds train_1, train_2, .*train_32$'):
    config_checks.check(c)
  c.data.train_tiles, c.data.test_tiles = (), ('test_2', 'test_2')
  with pytest.raises(ValueError, match=r"config\.data\.test_tiles=.*distinct tile names"):
    config_checks.check(c)
  c = importlib.import_module('configs.consep_smoke').get_config()
  for split, names in (('train', ('a_1', 'a_2')), ('test', ('b_1',))):
    for folder in ('Images', 'Labels'):
      (tmp_path / split.title() / folder).mkdir(parents=True)
    for n in names:
      (tmp_path / split.title() / 'Images' / f'{n}.png').write_bytes(b'')
      (tmp_path / split.title() / 'Labels' / f'{n}.mat').write_bytes(b'')
  c.data.manual_dir = str(tmp_path)
  c.data.train_tiles, c.data.test_tiles = ('a_2',), ('b_1',)
  config_checks.check(c)
  c.data.test_tiles = ('test_4',)
  with pytest.raises(ValueError, match=r"test_tiles: unknown tile\(s\) \['test_4'\]; the test split "
                     r'of consep holds b_1$'):
    config_checks.check(c)
  c.data.manual_dir = str(tmp_path / 'absent')
  monkeypatch.delenv('DIFFMIX_CONSEP_DIR', raising=False)
  with pytest.raises(ValueError, match=r"config\.data\.manual_dir='.*absent': no such folder"):
    config_checks.check(c)  # build_data would read it.
  c.stages = 'diffusion_train'
  config_checks.check(c)  # The names cannot be known without the folder; no stage reads it.


# A bad value for every field `config_checks.RULES` checks (right type, wrong value: ConfigDict
# already rejects a wrong type). The fields without a rule are the ones below.
BAD = {
    'seed': -1, 'stages': 'build_data,smaple', 'data.name': 'lizard', 'data.labels': 'raw',
    'data.num_classes': 1, 'data.class_names': ('a', '', 'b', 'c', 'd'), 'data.crop_size': 0,
    'data.num_workers': -1, 'data.prefetch': 0, 'data.mpp': 0.0, 'data.conic.test_fraction': 1.0,
    'data.conic.split_seed': -1, 'data.pannuke.train_folds': (1, 4),
    'data.pannuke.test_folds': (), 'mesh.data': 0, 'mesh.num_processes': 0,
    'mesh.process_id': -2, 'mesh.initialization_timeout': 0, 'mesh.heartbeat_timeout': -5,
    'diffusion.model.image_size': 0, 'diffusion.model.num_channels': 0,
    'diffusion.model.num_res_blocks': 0, 'diffusion.model.channel_mult': '1,x',
    'diffusion.model.attention_resolutions': '8,0', 'diffusion.model.num_heads': 0,
    'diffusion.model.num_head_channels': 0,
    'diffusion.model.dropout': 1.0, 'diffusion.model.dtype': 'float8',
    'diffusion.model.spade_hidden': 0, 'diffusion.schedule.diffusion_steps': 1,
    'diffusion.schedule.noise_schedule': 'cosine', 'diffusion.train.batch_size': 0,
    'diffusion.train.phase1_steps': -1, 'diffusion.train.phase2_steps': -1,
    'diffusion.train.phase1_lr': 0.0, 'diffusion.train.phase2_lr': -1e-4,
    'diffusion.train.phase1_drop_rate': 1.5, 'diffusion.train.phase2_drop_rate': -0.1,
    'diffusion.train.ema_rate': 1.01, 'diffusion.train.log_every_steps': 0,
    'diffusion.train.checkpoint_every_steps': 0, 'diffusion.train.keep_checkpoints': 0,
    'diffusion.train.sample_every_steps': -1, 'diffusion.train.sample_respacing': 'ddimx',
    'mix.num_workers': -1, 'mix.preview_tiles': -1, 'mix.balance.rare_classes': (0,),
    'mix.balance.common_classes': (2, 2), 'mix.balance.target_fraction': 1.2,
    'mix.balance.area_ratio': 0.0, 'mix.balance.dilation_iterations': -1,
    'mix.balance.border_margin': -1, 'mix.balance.paste_mode': 'blend',
    'mix.balance.max_replacements_per_tile': -1, 'mix.enlarge.preset': 'paper',
    'mix.enlarge.frame_margin': -1, 'mix.enlarge.axis_probability': 2.0,
    'mix.enlarge.shift_low': 20, 'mix.enlarge.shift_high': -20, 'mix.enlarge.collision': 'merge',
    'sample.timestep_respacing': '2000', 'sample.percent': 101, 'sample.guidance': -1.0,
    'sample.patch_size': 0, 'sample.grid_stride': 0, 'sample.batch_size': 0,
    'sample.shard_size': 0, 'sample.balance_patches': 'all', 'sample.cover_stride': 0,
    'hovernet.model.mode': 'slow',
    'hovernet.model.encoder_units': (3, 4, 6), 'hovernet.model.decoder_units': (8, 0),
    'hovernet.model.width': 3, 'hovernet.model.head_init': 'normal',
    'hovernet.train.runs': ('basline',), 'hovernet.train.seeds': (0, 0),
    'hovernet.train.synthetic_ratio': -0.5, 'hovernet.train.patch_window': 0,
    'hovernet.train.patch_step': 0, 'hovernet.train.phase1_epochs': -1,
    'hovernet.train.phase2_epochs': -1, 'hovernet.train.phase1_batch_size': 0,
    'hovernet.train.phase2_batch_size': 0, 'hovernet.train.lr': 0.0,
    'hovernet.train.lr_step_epochs': 0, 'hovernet.train.lr_gamma': 0.0,
    'hovernet.train.mse_weight': -1.0, 'hovernet.train.tp_class_weighting': 'inverse',
    'hovernet.train.loader_threads': 0, 'hovernet.train.log_every_steps': 0,
    'hovernet.train.checkpoint_every_epochs': 0, 'hovernet.train.keep_checkpoints': 0,
    'hovernet.train.val_tiles': -1, 'hovernet.train.val_every_epochs': 0,
    'eval.match_radius': 0, 'eval.f_c_weights': (2, 2, 1), 'eval.batch_size': 0,
    'eval.postprocess.np_threshold': 1.0, 'eval.postprocess.edge_threshold': 0.0,
    'eval.postprocess.min_area': 0, 'eval.postprocess.sobel_ksize': 10,
    'eval.postprocess.marker_open': 4,
    # Checked by name against the split (config_checks.check_tile_names).
    'data.train_tiles': ('train_1', 'train_99'), 'data.test_tiles': ('test_1', 'test_1'),
}
# Tied to data.num_classes (one FieldReference): checked through it.
TIED = {'diffusion.model.num_classes', 'hovernet.model.nr_types'}
FREE = {  # Booleans, paths (checked where a selected stage reads them), free text.
    'name', 'compilation_cache', 'data.data_dir', 'data.manual_dir', 'data.conic.exclude',  # CoNIC's cohorts: checked by its builder.
    'mesh.shard_opt_state',
    'mesh.distributed', 'mesh.coordinator_address', 'diffusion.model.learn_sigma',
    'diffusion.model.no_instance', 'diffusion.model.remat', 'diffusion.model.resblock_updown',
    'diffusion.model.use_scale_shift_norm', 'sample.official_truncation', 'sample.params_path',
    'hovernet.model.split_grouped_convs', 'hovernet.train.augment',
    'hovernet.train.phase1_freeze_bn_stats', 'hovernet.train.pretrained',
    'hovernet.train.synthetic_dir', 'eval.synthetic_fidelity',
}


def _leaves(d, prefix=''):
  for k, v in d.items():
    if hasattr(v, 'items'):
      yield from _leaves(v, f'{prefix}{k}.')
    else:
      yield f'{prefix}{k}'


def test_every_checked_field_rejects_a_bad_value_by_name():
  """Each enumerated, comma-list, class-id and numeric field of configs/common.py, set to a bad
  value in the demo config, fails `check` with a ValueError naming that field."""
  assert set(BAD) | FREE | TIED == set(_leaves(common.base_config())), 'a field without a decision'
  assert not set(BAD) & FREE and not (set(BAD) | FREE) & TIED
  for field, bad in BAD.items():
    c = importlib.import_module('configs.demo').get_config()
    section, key = field.rsplit('.', 1) if '.' in field else ('', field)
    node = c
    for part in filter(None, section.split('.')):
      node = node[part]
    node[key] = bad
    with pytest.raises(ValueError, match=r'config\.' + re.escape(field) + r'\b') as e:
      config_checks.check(c)
    assert any(w in str(e.value) for w in ('expected', 'must', 'holds')), str(e.value)  # The form.


def test_a_bad_value_stops_main_before_any_stage(tmp_path):
  """`--config.hovernet.train.runs=basline` on the demo: an error naming the field, no workdir."""
  workdir = tmp_path / 'run'
  res = subprocess.run(
      [sys.executable, '-m', 'diffmix_jax.main', '--config', 'configs/demo.py', '--workdir',
       str(workdir), '--config.hovernet.train.runs=basline'], cwd=ROOT, capture_output=True,
      text=True, timeout=HANG_TIMEOUT)
  assert res.returncode != 0
  assert ("main: error: config.hovernet.train.runs=('basline',)" in res.stderr
          and "distinct arms from baseline, balancing, enlarging, diffmix; not allowed: ['basline']"
          in res.stderr)
  assert not workdir.exists()  # Nothing ran: main makes the workdir after the checks.


def _from_command_line(*overrides):
  """The config `main` would get from `--config configs/consep.py <overrides>` (config_flags)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  argv = ['main', '--config', str(ROOT / 'configs' / 'consep.py'), *overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  return values.config


def test_class_count_is_one_value_tied_across_config_files_and_the_command_line():
  """data.num_classes, diffusion.model.num_classes and hovernet.model.nr_types are one
  FieldReference: a config file or a --config flag that sets any of them sets all three."""
  count = lambda c: (c.data.num_classes, c.diffusion.model.num_classes, c.hovernet.model.nr_types)
  assert count(importlib.import_module('configs.glysac').get_config()) == (4, 4, 4)  # File override.
  assert count(common.base_config()) == (5, 5, 5)  # The override changed no other config.
  assert count(_from_command_line('--config.hovernet.model.nr_types=3')) == (3, 3, 3)
  assert count(_from_command_line('--config.data.num_classes=0')) == (0, 0, 0)  # Table's count.
  c = _from_command_line('--config.hovernet.train.seeds=0,2', '--config.data.test_tiles=test_4',
                         """--config.hovernet.train.runs=('baseline','diffmix')""")
  assert (c.hovernet.train.seeds, c.data.test_tiles, c.hovernet.train.runs) == (
      (0, 2), ('test_4',), ('baseline', 'diffmix'))
  c.stages = 'mix_labels'
  assert config_checks.check(c) == ['mix_labels']
  c = _from_command_line('--config.hovernet.train.runs=baseline,diffmix')  # One name, a comma in it.
  with pytest.raises(ValueError, match=r"runs=\('baseline,diffmix',\).*written \"\('a','b'\)\""):
    config_checks.check(c)
