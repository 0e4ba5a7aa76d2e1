"""Tests of configs/: every experiment config loads and validates; bad values name their field."""

import importlib

import pytest

from configs import common
from diffmix_jax.core import arms
from diffmix_jax import config_checks

CONFIGS = ('consep', 'glysac', 'consep_smoke', 'demo', 'demo_study', 'tiny')


@pytest.mark.parametrize('name', CONFIGS)
def test_configs_load_and_validate(name, tmp_path):
  c = importlib.import_module(f'configs.{name}').get_config()
  if c.hovernet.train.phase1_epochs:  # The paper's configs: phase 1 needs the ImageNet file.
    (tmp_path / 'encoder.tar').write_bytes(b'')
    c.hovernet.train.pretrained = str(tmp_path / 'encoder.tar')
  config_checks.validate(c)
  # Configs override values only: the field set is the base config's.
  assert set(c.to_dict()) == set(common.base_config().to_dict())


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
    ('data.name', 'pannuke', 'config.data.name'),
    ('data.labels', 'raw', 'config.data.labels'),
    ('diffusion.model.num_classes', 4, 'config.diffusion.model.num_classes=4 must equal'),
    ('data.class_names', 'a,b', 'config.data.class_names'),
    ('diffusion.train.batch_size', 0, 'config.diffusion.train.batch_size=0'),
    ('mix.balance.rare_classes', '7', r'config.mix.balance.rare_classes: class id\(s\) \[7\]'),
    ('mix.balance.common_classes', '2,x', 'config.mix.balance.common_classes'),
    ('sample.percent', 120, 'config.sample.percent=120'),
    ('data.crop_size', 128, 'config.data.crop_size=128 must equal'),
    ('hovernet.model.head_init', 'normal', "config.hovernet.model.head_init='normal'"),
    ('hovernet.model.mode', 'slow', "config.hovernet.model.mode='slow'"),
    ('hovernet.train.runs', 'baseline,basline', 'config.hovernet.train.runs=.*unknown: basline'),
    ('hovernet.train.runs', 'diffmix,diffmix', 'expected a comma list of distinct arms'),
    ('hovernet.train.seeds', '0,x', "config.hovernet.train.seeds='0,x'"),
    ('hovernet.train.seeds', '1,1', "config.hovernet.train.seeds='1,1'"),
    ('hovernet.train.seeds', '-1', "config.hovernet.train.seeds='-1'"),
])
def test_bad_values_name_the_field(field, value, match):
  c = importlib.import_module('configs.consep').get_config()
  section, key = field.rsplit('.', 1)
  node = c
  for part in section.split('.'):
    node = node[part]
  node[key] = value
  with pytest.raises(ValueError, match=match):
    config_checks.validate(c)


@pytest.mark.parametrize('name', ['consep', 'glysac'])
def test_frozen_phase_without_imagenet_encoder_is_rejected(name, tmp_path):
  """Phase 1 trains decoders on a frozen encoder: from random weights it is an error, named."""
  c = importlib.import_module(f'configs.{name}').get_config()
  with pytest.raises(ValueError, match=r'config\.hovernet\.train\.phase1_epochs=50 .*'
                     r'config\.hovernet\.train\.pretrained is empty.*ImageNet-ResNet50-Preact'):
    config_checks.validate(c)
  c.hovernet.train.pretrained = str(tmp_path / 'absent.tar')
  with pytest.raises(ValueError, match=r"pretrained='.*absent\.tar': no such file"):
    config_checks.validate(c)
  c.stages = 'build_data,diffusion_train'  # Without HoVer-Net training the field is not read.
  config_checks.validate(c)
  c.stages = common.base_config().stages
  c.hovernet.train.phase1_epochs = 0  # Everything trainable from scratch: allowed.
  c.hovernet.train.pretrained = ''
  config_checks.validate(c)


def test_arms_seeds_and_run_names():
  c = importlib.import_module('configs.tiny').get_config()
  c.hovernet.train.runs, c.hovernet.train.seeds = 'diffmix, baseline,enlarging', '2,0'
  # Seeds outer (a killed study has whole seeds done); seed 0 keeps the single-seed names.
  assert arms.runs(c) == [('diffmix', 2), ('baseline', 2), ('enlarging', 2), ('diffmix', 0),
                          ('baseline', 0), ('enlarging', 0)]
  assert [arms.run_name(a, s) for a, s in arms.runs(c)][:3] == [
      'diffmix_s2', 'baseline_s2', 'enlarging_s2']
  assert arms.fidelity_run(c) == 'baseline_s2'  # The first seed's baseline.
  c.hovernet.train.runs = 'balancing'
  assert arms.fidelity_run(c) is None
  assert arms.ARMS['diffmix'] == arms.ARMS['balancing'] + arms.ARMS['enlarging']


def test_tile_subsets_name_known_tiles_once(tmp_path, monkeypatch):
  """data.train_tiles / data.test_tiles: checked as main starts, against the demo set's names or
  the CoNSeP folder's files; the folder absent, `build_data` reports it instead."""
  c = importlib.import_module('configs.demo').get_config()
  c.data.train_tiles, c.data.test_tiles = 'train_1, train_32', 'test_8'
  config_checks.validate(c)
  c.data.train_tiles = 'train_1,train_33'
  with pytest.raises(ValueError, match=r"config\.data\.train_tiles: unknown tile\(s\) \['train_33'\]; "
                     r'the train split of demo_nuclei holds train_1, train_2, .*train_32$'):
    config_checks.validate(c)
  c.data.train_tiles, c.data.test_tiles = '', 'test_2,test_2'
  with pytest.raises(ValueError, match=r"config\.data\.test_tiles: tile\(s\) \['test_2'\] named more"):
    config_checks.validate(c)
  c = importlib.import_module('configs.consep_smoke').get_config()
  for split, names in (('train', ('a_1', 'a_2')), ('test', ('b_1',))):
    for folder in ('Images', 'Labels'):
      (tmp_path / split.title() / folder).mkdir(parents=True)
    for n in names:
      (tmp_path / split.title() / 'Images' / f'{n}.png').write_bytes(b'')
      (tmp_path / split.title() / 'Labels' / f'{n}.mat').write_bytes(b'')
  c.data.manual_dir = str(tmp_path)
  c.data.train_tiles, c.data.test_tiles = 'a_2', 'b_1'
  config_checks.validate(c)
  c.data.test_tiles = 'test_4'
  with pytest.raises(ValueError, match=r"test_tiles: unknown tile\(s\) \['test_4'\]; the test split "
                     r'of consep holds b_1$'):
    config_checks.validate(c)
  c.data.manual_dir = str(tmp_path / 'absent')
  monkeypatch.delenv('DIFFMIX_CONSEP_DIR', raising=False)
  config_checks.validate(c)  # Unknown until the folder exists: build_data names the missing folder.
